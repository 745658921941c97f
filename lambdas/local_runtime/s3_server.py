"""The local S3: a moto server on 127.0.0.1, the embedded default of ARCHITECTURE §6.

Given a data directory, it keeps its objects across a stop and a start
(:mod:`lambdas.local_runtime.s3_snapshot`): moto holds them in memory only.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

from moto.server import ThreadedMotoServer

from lambdas.local_runtime.s3_snapshot import (
    Restored,
    restore_buckets,
    save_buckets,
    snapshot_client,
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalS3:
    """A moto S3 server in this process; ``url`` is its endpoint for boto3's ``endpoint_url``.

    With ``data_dir``, :meth:`start` puts back the objects saved there and :meth:`stop` saves
    the objects of ``buckets`` there (every bucket when ``None``: moto's buckets belong to the
    process, so a process that runs several servers names its own; ``restored`` says what came
    back)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | Path | None = None,
        buckets: Collection[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.buckets = None if buckets is None else frozenset(buckets)
        self.restored = Restored({})
        self._server = ThreadedMotoServer(ip_address=host, port=self.port, verbose=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalS3:
        # moto answers any credentials; set harmless ones so boto3 never looks for real ones
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server.start()
        if self.data_dir is not None:
            self.restored = restore_buckets(snapshot_client(self.url), self.data_dir)
        return self

    def save(self) -> int:
        """Write every object to ``data_dir`` now; returns how many (0 without one)."""
        if self.data_dir is None:
            return 0
        return save_buckets(snapshot_client(self.url), self.data_dir, self.buckets)

    def stop(self) -> None:
        try:
            self.save()
        finally:
            self._server.stop()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
