"""A small typed client of FLStore's HTTP API (ARCHITECTURE §4), standard library only.

>>> client = FLStoreClient.from_local()          # the stack of `flstore local up`
>>> answer = client.run("demo", "cosine_select", round=0, k=3)
>>> answer["result"]["selected"], answer["meta"]["latency_ms"]

Connections are persistent (HTTP/1.1 keep-alive) and pooled: a request takes an idle connection
or opens one and gives it back when the answer is read, so benchmarks that call the client in a
loop pay the TCP (and TLS) handshake once, and one client may be shared by many threads (each
request in flight holds its own connection).
Error answers are raised as the typed errors of :mod:`flstore_core.errors`, rebuilt from the
API's ``{"error": {"code", "message"}}`` body; a server that cannot be reached raises
:class:`~flstore_core.errors.UnavailableError` naming the URL.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from flstore_core import __version__
from flstore_core.errors import (
    FLStoreError,
    UnavailableError,
    ValidationError,
    error_from_dict,
)
from flstore_core.ids import validate_job, validate_round

LOCAL_CONFIG = ".flstore/local.json"
WORKLOAD_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

# Failures that mean a reused keep-alive connection had been closed by the server while idle:
# the request is resent once on a fresh connection (workload runs are idempotent by design).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
# Gateway answers without an FLStore error body that mean "try again later".
_RETRYABLE_STATUS = {429, 502, 504}


class _Connection(http.client.HTTPConnection):
    """An HTTP connection with Nagle's algorithm off: small requests leave at once."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TLSConnection(http.client.HTTPSConnection):
    """An HTTPS connection with Nagle's algorithm off."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FLStoreClient:
    """Client of an FLStore HTTP API at ``base_url`` (a local gateway or API Gateway stage URL).

    Parameters
    ----------
    base_url : str
        ``http(s)://host[:port][/stage]``; routes ``/v1/...`` are appended to it.
    token : str or None, default None
        Bearer token sent with every request but ``/v1/health``.
    timeout : float, default 300
        Seconds to wait to connect and for each read of an answer.
    max_idle : int, default 32
        Idle keep-alive connections kept for reuse; more concurrent requests open more, closed
        when they end.
    """

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 300, max_idle: int = 32
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError(f"invalid base URL {base_url!r}: use http(s)://host[:port]")
        if timeout <= 0:
            raise ValidationError(f"timeout must be > 0 seconds, got {timeout!r}")
        if token is not None and (not token or not token.isprintable() or " " in token):
            raise ValidationError("invalid token: a bearer token is printable text with no spaces")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.max_idle = max_idle
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []  # LIFO: the warmest connection first

    @classmethod
    def from_local(cls, path: str | Path = LOCAL_CONFIG, timeout: float = 300) -> FLStoreClient:
        """A client of the local stack described by ``.flstore/local.json`` (ARCHITECTURE §6)."""
        file = Path(path)
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnavailableError(
                f"no local FLStore stack: {file} does not exist; run `flstore local up` first"
            ) from None
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot read {file}: {exc}") from exc
        if not isinstance(config, dict) or not isinstance(config.get("gateway_url"), str):
            raise ValidationError(f"{file} has no 'gateway_url'; run `flstore local up` again")
        token = config.get("token")
        return cls(config["gateway_url"], token if isinstance(token, str) else None, timeout)

    # -- routes ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: ``{"status": "ok"}`` when the API answers."""
        return self._request("GET", "/v1/health", auth=False)

    def workloads(self) -> list[dict[str, Any]]:
        """``GET /v1/workloads``: each ``{"name", "class", "params", "description"}``."""
        answer: list[dict[str, Any]] = self._request("GET", "/v1/workloads")["workloads"]
        return answer

    def rounds_page(
        self, job: str, limit: int | None = None, after: int | None = None
    ) -> dict[str, Any]:
        """One page of ``GET /v1/jobs/{job}/rounds?limit=&after=``: ``{"job", "rounds",
        "next"}``, the rounds after ``after`` (ascending, at most ``limit``, 1 to 1000) and
        ``next``, the ``after`` of the next page (``None`` on the last)."""
        validate_job(job)
        query = {}
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
                raise ValidationError(f"invalid limit {limit!r}: use an integer between 1 and 1000")
            query["limit"] = limit
        if after is not None:
            query["after"] = validate_round(after)
        route = f"/v1/jobs/{job}/rounds" + (f"?{urlencode(query)}" if query else "")
        return self._request("GET", route)

    def iter_rounds(
        self, job: str, after: int | None = None, page_size: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every visible round after ``after`` (all by default), ``{"round", "clients",
        "bytes"}``, reading the pages one by one as the iteration reaches them."""
        while True:
            page = self.rounds_page(job, page_size, after)
            yield from page["rounds"]
            after = page.get("next")
            if after is None:
                return

    def rounds(
        self, job: str, limit: int | None = None, after: int | None = None
    ) -> list[dict[str, Any]]:
        """The visible rounds after ``after`` (all by default), at most ``limit`` of them (all
        by default), each ``{"round", "clients", "bytes"}``: as many pages as that takes."""
        if limit is None:
            return list(self.iter_rounds(job, after))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError(f"invalid limit {limit!r}: use a positive integer")
        return list(itertools.islice(self.iter_rounds(job, after, min(limit, 1000)), limit))

    def run(
        self,
        job: str,
        workload: str,
        round: int | None = None,
        rounds: Sequence[int] | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Run ``workload`` on ``job``: ``POST /v1/jobs/{job}/workloads/{workload}``.

        Give ``round`` for a round workload, ``rounds`` (or neither) for one that spans rounds;
        keyword arguments are the workload's parameters. Returns the whole answer
        ``{"job", "workload", "round", "result", "meta"}``.
        """
        validate_job(job)
        if not isinstance(workload, str) or not WORKLOAD_RE.fullmatch(workload):
            raise ValidationError(
                f"invalid workload name {workload!r}: use lowercase a-z, 0-9 and '_' "
                "(see `workloads()` for the catalogue)"
            )
        if round is not None and rounds is not None:
            raise ValidationError("give either round or rounds, not both")
        body: dict[str, Any] = {}
        if round is not None:
            body["round"] = validate_round(round)
        if rounds is not None:
            body["rounds"] = [validate_round(r) for r in rounds]
        body["params"] = params
        return self._request("POST", f"/v1/jobs/{job}/workloads/{quote(workload)}", body)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the idle connections; the client stays usable and reconnects when next used."""
        with self._lock:
            connections, self._idle = self._idle, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> FLStoreClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FLStoreClient({self.base_url!r})"

    # -- transport ------------------------------------------------------------------------

    def _checkout(self, fresh: bool) -> tuple[http.client.HTTPConnection, bool]:
        """An idle pooled connection (and True), or a new one (and False)."""
        if not fresh:
            with self._lock:
                if self._idle:
                    return self._idle.pop(), True
        if self._https:
            return _TLSConnection(self._host, self._port, timeout=self.timeout), False
        return _Connection(self._host, self._port, timeout=self.timeout), False

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _request(
        self, method: str, route: str, body: Mapping[str, Any] | None = None, *, auth: bool = True
    ) -> dict[str, Any]:
        url = self.base_url + route
        headers = {"Accept": "application/json", "User-Agent": f"flstore-client/{__version__}"}
        if auth and self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        fresh = False
        while True:
            conn, reused = self._checkout(fresh)
            try:
                conn.request(method, self._prefix + route, body=payload, headers=headers)
                response = conn.getresponse()
                status, data = response.status, response.read()
            except _STALE as exc:
                conn.close()
                if reused:
                    fresh = True  # the server closed an idle keep-alive connection: resend once
                    continue
                raise UnavailableError(
                    f"FLStore API at {url} dropped the connection: {exc}"
                ) from exc
            except TimeoutError:
                conn.close()
                raise UnavailableError(
                    f"FLStore API at {url} did not answer within {self.timeout:g} s"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise UnavailableError(f"cannot reach FLStore API at {url}: {exc}") from exc
            if response.will_close:
                conn.close()
            else:
                self._checkin(conn)
            return _decode(method, url, status, data)


def _decode(method: str, url: str, status: int, data: bytes) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or the typed error of any other."""
    try:
        answer = json.loads(data) if data else None
    except ValueError:
        answer = None
    if 200 <= status < 300:
        if not isinstance(answer, dict):
            raise FLStoreError(f"{method} {url} answered {status} without a JSON object")
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        raise error_from_dict(answer, status)
    # Not an FLStore error body: e.g. API Gateway's own {"message": "..."} or a proxy's page.
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        detail = answer["message"]
    else:
        detail = data[:200].decode("utf-8", "replace").strip() or "no body"
    message = f"{method} {url} answered {status}: {detail}"
    if status in _RETRYABLE_STATUS:
        raise UnavailableError(message)
    raise error_from_dict({"error": {"code": "", "message": message}}, status)


def result_model(response: Mapping[str, Any]) -> str | None:
    """The S3 key of the model a workload stored (``result["model_key"]``), if any."""
    result = response.get("result")
    if not isinstance(result, Mapping):
        return None
    key = result.get("model_key")
    return key if isinstance(key, str) else None
