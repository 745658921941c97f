"""The end-of-round writer of a small deployment (no separate ingestion service).

An FL server calls :meth:`RoundWriter.write_round` when a round ends, with the clients' updates
and (optionally) the new global model. The writer drops them as raw update files (ARCHITECTURE
§2: uncompressed safetensors, identity and metrics in ``__metadata__``) into a local directory
or an S3 staging prefix, one folder per round::

    {destination}/{job}/{round:08d}/updates/{client}.safetensors
    {destination}/{job}/{round:08d}/global.safetensors
    {destination}/{job}/initial/initial.safetensors

Each folder is exactly one ingestion source (``flstore ingest {destination}/{job}/{round:08d}``).
Files appear whole — a local file is written under a hidden temporary name and renamed; an S3
PUT is atomic — so an ingestion running concurrently never reads half a file. To ingest at once,
pass ``on_round``: it is called with the :class:`RoundDrop` after the files are written (the
pipelines package provides one, ``pipelines.ingest.ingest_on_drop``; this module does not import
it, as ``flstore_core`` never imports ``pipelines``).

:meth:`RoundWriter.write_round` writes (and ingests) before it returns. A server that must not
wait — ingestion of a round takes seconds — calls :meth:`RoundWriter.submit_round` instead: the
round is encoded at once (the encoded bytes are the writer's own copy: the caller may reuse its
arrays as soon as the call returns), then written and ingested in the background, one round at a
time in round order, at most ``max_in_flight`` rounds in flight (a further ``submit_round``
waits). :meth:`RoundWriter.flush` (or :meth:`RoundWriter.close`, or leaving a ``with`` block)
waits for them and raises :class:`~flstore_core.sdk.handover.RoundsNotStoredError` naming any
round that failed (each also logged, with its number, when it fails).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flstore_core.data.codec import Kind, Update
from flstore_core.data.rawfile import RAW_SUFFIX, write_raw_update
from flstore_core.errors import ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.sdk.handover import DEFAULT_MAX_IN_FLIGHT, RoundHandover

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass(frozen=True)
class RoundDrop:
    """The files one call wrote: ``source`` is the folder holding exactly them."""

    job: str
    round: int | None  # None for the initial model
    source: str
    files: tuple[str, ...]
    bytes: int
    ingested: Any = None  # what ``on_round`` returned, when it was called


OnRound = Callable[[RoundDrop], Any]


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → ``("bucket", "prefix/")`` (prefix empty or ending in ``/``)."""
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValidationError(f"S3 destination {url!r} needs a bucket: s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class RoundWriter:
    """Drops a job's rounds as raw update files into ``destination`` (a directory or
    ``s3://bucket/prefix``).

    Parameters
    ----------
    destination : str
        Local directory (created if missing) or ``s3://bucket/prefix``.
    job : str
        The job every file belongs to.
    on_round : callable, optional
        Called with each :class:`RoundDrop` after its files are written (``ingest=False`` on a
        call skips it); its return value is kept in ``RoundDrop.ingested``.
    s3_endpoint : str, optional
        S3 endpoint (moto locally); default ``FLSTORE_S3_ENDPOINT`` or AWS.
    s3 : S3Client, optional
        A ready boto3 S3 client (overrides ``s3_endpoint``).
    max_workers : int, default 8
        Parallel uploads to S3.
    max_in_flight : int, default 2
        Rounds :meth:`submit_round` may have written and ingested in the background before
        it waits (0: it writes and ingests before it returns).
    """

    def __init__(
        self,
        destination: str | Path,
        job: str,
        *,
        on_round: OnRound | None = None,
        s3_endpoint: str | None = None,
        s3: S3Client | None = None,
        max_workers: int = 8,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.job = validate_job(job)
        self.destination = str(destination)
        self.on_round = on_round
        self.max_workers = max(1, max_workers)
        self._s3 = s3
        self._s3_endpoint = s3_endpoint
        self.is_s3 = self.destination.startswith("s3://")
        if self.is_s3:
            self.bucket, self.prefix = split_s3_url(self.destination)
        self.handover = RoundHandover(max_in_flight, what=f"job {self.job!r}")

    # ------------------------------------------------------------------ where

    def round_source(self, round_: int) -> str:
        """The folder of one round: what ``flstore ingest`` takes to ingest just that round."""
        return self._join(f"{self.job}/{validate_round(round_):08d}/")

    def initial_source(self) -> str:
        return self._join(f"{self.job}/initial/")

    def _join(self, relative: str) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.prefix}{relative}"
        return os.path.join(self.destination, relative)

    # ------------------------------------------------------------------ writing

    def write_round(
        self,
        round_: int,
        updates: Mapping[str, Update],
        *,
        global_model: Update | None = None,
        ingest: bool | None = None,
    ) -> RoundDrop:
        """Write a round's client updates (``client id → Update``) and its global model.

        Every id is validated before the first byte is written. The updates' own ``job``,
        ``round``, ``client`` and ``kind`` are ignored (the arguments say what they are); the
        caller's objects are not modified.
        """
        return self._drop(*self._encode_round(round_, updates, global_model), ingest)

    def submit_round(
        self,
        round_: int,
        updates: Mapping[str, Update],
        *,
        global_model: Update | None = None,
        ingest: bool | None = None,
    ) -> Future[RoundDrop]:
        """:meth:`write_round` in the background: validates and encodes the round now (bad ids
        raise here; the caller's arrays are free once this returns), then writes and ingests
        it after the rounds submitted before it. Waits only while ``max_in_flight`` rounds are
        in flight; :meth:`flush` raises a round that failed."""
        encoded = self._encode_round(round_, updates, global_model)
        return self.handover.submit(round_, lambda: self._drop(*encoded, ingest))

    def flush(self) -> None:
        """Wait for every submitted round; raise
        :class:`~flstore_core.sdk.handover.RoundsNotStoredError` naming any that failed."""
        self.handover.flush()

    def close(self) -> None:
        """:meth:`flush`, then stop the background thread."""
        self.handover.close()

    def __enter__(self) -> RoundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.handover.__exit__(exc_type, *rest)

    def _encode_round(
        self, round_: int, updates: Mapping[str, Update], global_model: Update | None
    ) -> tuple[int, str, list[tuple[str, bytes]]]:
        """The round's files, encoded (every id validated first)."""
        validate_round(round_)
        named: list[tuple[str, Update]] = []
        for client, update in updates.items():
            validate_client(client)
            named.append(
                (f"updates/{client}{RAW_SUFFIX}", _as(update, self.job, round_, client, "update"))
            )
        if global_model is not None:
            named.append(
                (f"global{RAW_SUFFIX}", _as(global_model, self.job, round_, None, "global"))
            )
        if not named:
            raise ValidationError(f"round {round_}: nothing to write (no updates, no model)")
        return round_, self.round_source(round_), _encoded(named)

    def write_initial(self, model: Update, *, ingest: bool | None = None) -> RoundDrop:
        """Write the job's model before round 0."""
        named = [(f"initial{RAW_SUFFIX}", _as(model, self.job, None, None, "initial"))]
        return self._drop(None, self.initial_source(), _encoded(named), ingest)

    def _drop(
        self,
        round_: int | None,
        source: str,
        blobs: list[tuple[str, bytes]],
        ingest: bool | None,
    ) -> RoundDrop:
        if self.is_s3:
            files = self._put_s3(source, blobs)
        else:
            files = [self._put_local(source, name, data) for name, data in blobs]
        drop = RoundDrop(
            self.job, round_, source, tuple(files), sum(len(data) for _, data in blobs)
        )
        if self.on_round is not None and ingest is not False:
            drop = replace(drop, ingested=self.on_round(drop))
        return drop

    def _put_local(self, folder: str, name: str, data: bytes) -> str:
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # a hidden temporary name that no *.safetensors pattern matches, then an atomic rename
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(path)

    def _client(self) -> S3Client:
        if self._s3 is None:
            from flstore_core.aws import s3_client

            self._s3 = s3_client(self._s3_endpoint)
        return self._s3

    def _put_s3(self, source: str, blobs: list[tuple[str, bytes]]) -> list[str]:
        client = self._client()
        _, folder = split_s3_url(source)

        def put(item: tuple[str, bytes]) -> str:
            name, data = item
            key = folder + name
            client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream"
            )
            return f"s3://{self.bucket}/{key}"

        with ThreadPoolExecutor(min(self.max_workers, len(blobs))) as pool:
            return list(pool.map(put, blobs))


def _encoded(named: list[tuple[str, Update]]) -> list[tuple[str, bytes]]:
    """Each file's raw bytes (a copy of its arrays)."""
    return [(name, write_raw_update(update)) for name, update in named]


def _as(update: Update, job: str, round_: int | None, client: str | None, kind: Kind) -> Update:
    """The same tensors and metrics under the given identity (no tensor is copied)."""
    return Update(
        tensors=update.tensors,
        num_examples=update.num_examples,
        metrics=dict(update.metrics),
        job=job,
        round=round_,
        client=client,
        kind=kind,
    )
