"""S3 misbehaving under the blob store: what botocore's retries do not cover is resumed or a
typed 503, never an untyped exception (which the router would answer as a 500).

botocore retries a request whose answer never came (a reset before the answer, SlowDown, a 500)
but not a body cut short once its answer began; and when its own attempts run out it raises a
``BotoCoreError``, not a ``ClientError``. Both go through a real moto server behind the chaos
benchmark's fault proxy, or through a client that fails exactly as told.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    ResponseStreamingError,
)

from flstore_core.aws import s3_client
from flstore_core.errors import UnavailableError
from flstore_core.storage.s3 import READ_ATTEMPTS, S3BlobStore
from lambdas.local_runtime.fault_proxy import FaultProxy, Faults

DATA = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable


def test_a_body_cut_short_by_the_proxy_is_resumed(s3_server: Any) -> None:
    """Every answer cut off halfway: get, a stream read in pieces and a ranged get still return
    the object's bytes (each resumption reads the rest of the same version)."""
    with FaultProxy(s3_server.url) as proxy:
        store = S3BlobStore("cut-test", s3_client(proxy.url))
        store.prepare()
        store.put("k", DATA)
        proxy.faults = Faults(cut=0.5)
        for _ in range(8):
            assert store.get("k") == DATA
            stream = store.open("k")
            assert stream is not None
            pieces = []
            while piece := stream.read(100_000):
                pieces.append(piece)
            stream.close()
            assert b"".join(pieces) == DATA
            assert store.get_range("k", 1000, 300_000) == DATA[1000:300_000]
        assert proxy.counts().get("cut", 0) >= 8


class Body:
    """A StreamingBody that fails with ``error`` once ``fail_after`` bytes were read."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.pos, self.fail_after = data, 0, fail_after

    def read(self, size: int | None = None) -> bytes:
        stop = len(self.data) if size is None else min(len(self.data), self.pos + size)
        if self.fail_after is not None and stop > self.fail_after:
            self.pos = self.fail_after  # what arrived before the reset is lost with the read
            raise ResponseStreamingError(error="connection reset by peer")
        out = self.data[self.pos : stop]
        self.pos = stop
        return out

    def close(self) -> None:
        pass


class Client:
    """An S3 client whose bodies are cut after ``cuts[i]`` bytes on the i-th GET (then whole),
    or whose every call raises ``error``."""

    def __init__(self, cuts: list[int] = [], error: Exception | None = None) -> None:  # noqa: B006
        self.cuts, self.error = list(cuts), error
        self.calls: list[dict[str, Any]] = []
        self.etag = '"abc"'
        self.rewritten = False

    def _fail(self) -> None:
        if self.error is not None:
            raise self.error

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self._fail()
        self.calls.append(kwargs)
        if self.rewritten and kwargs.get("IfMatch") not in (None, '"new"'):
            raise ClientError({"Error": {"Code": "PreconditionFailed"}}, "GetObject")
        start = 0
        if "Range" in kwargs:
            first, _, last = kwargs["Range"].removeprefix("bytes=").partition("-")
            start = int(first)
            data = DATA[start : int(last) + 1] if last else DATA[start:]
        else:
            data = DATA
        cut = self.cuts.pop(0) if self.cuts else None
        return {"Body": Body(data, cut), "ETag": self.etag, "ContentLength": len(data)}

    def head_object(self, **kwargs: Any) -> dict[str, Any]:
        self._fail()
        return {"ContentLength": len(DATA), "ETag": self.etag}

    def put_object(self, **kwargs: Any) -> None:
        self._fail()

    def delete_object(self, **kwargs: Any) -> None:
        self._fail()

    def get_paginator(self, name: str) -> Any:
        client = self

        class Pages:
            def paginate(self, **kwargs: Any) -> Any:
                client._fail()
                return iter([{"Contents": []}])

        return Pages()


def test_a_stream_resumes_where_it_stopped_with_the_same_version() -> None:
    client = Client(cuts=[300_000, 200_000])
    store = S3BlobStore("b", client)  # type: ignore[arg-type]
    stream = store.open("k")
    assert stream is not None
    pieces = []
    while piece := stream.read(100_000):
        pieces.append(piece)
    assert b"".join(pieces) == DATA
    assert [c.get("Range") for c in client.calls] == [None, "bytes=300000-", "bytes=500000-"]
    assert all(c.get("IfMatch") == '"abc"' for c in client.calls[1:])
    # a whole read cut short loses what it had read: it starts again from the beginning
    client = Client(cuts=[300_000])
    assert S3BlobStore("b", client).get("k") == DATA  # type: ignore[arg-type]
    assert [c.get("Range") for c in client.calls] == [None, "bytes=0-"]


def test_a_body_cut_short_too_often_is_a_503() -> None:
    client = Client(cuts=[1000] * READ_ATTEMPTS)
    store = S3BlobStore("b", client)  # type: ignore[arg-type]
    with pytest.raises(UnavailableError, match="failed while reading"):
        store.get("k")
    client.cuts = [1000] * READ_ATTEMPTS
    with pytest.raises(UnavailableError, match="failed while reading"):
        store.get_range("k", 0, 5000)


def test_an_object_rewritten_while_it_is_read_is_a_503_not_a_splice() -> None:
    client = Client(cuts=[1000])
    store = S3BlobStore("b", client)  # type: ignore[arg-type]
    stream = store.open("k")
    assert stream is not None
    assert stream.read(1000) == DATA[:1000]
    client.rewritten = True
    with pytest.raises(UnavailableError):
        stream.read()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("k"),
        lambda s: s.open("k"),
        lambda s: s.get_range("k", 0, 10),
        lambda s: s.head("k"),
        lambda s: s.put("k", b"x"),
        lambda s: list(s.list("p/")),
        lambda s: s.delete("k"),
    ],
    ids=["get", "open", "get_range", "head", "put", "list", "delete"],
)
def test_connection_failures_botocore_gave_up_on_are_503s(call: Any) -> None:
    """botocore raises ``EndpointConnectionError`` (a ``BotoCoreError``) once its retries of a
    dropped connection run out: the blob store's contract is an UnavailableError (503)."""
    client = Client(error=EndpointConnectionError(endpoint_url="http://s3"))
    store = S3BlobStore("b", client)  # type: ignore[arg-type]
    with pytest.raises(UnavailableError):
        call(store)
