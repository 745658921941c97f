# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""Reading raw update files (ARCHITECTURE §2) through Beam's filesystems.

Paths are whatever Beam's ``FileSystems`` serves — a local directory, ``s3://`` (Beam's S3
filesystem, pointed at moto locally with ``--s3_endpoint_url``), ``gs://`` on Dataflow. Two reads
per file:

* the **header** — the 8-byte length and the JSON header, a few kilobytes — is all that the
  validation of ids, metadata, dtypes, truncation and round agreement needs, so a round is
  checked before any of its data is read. On S3 the header is read through Beam's ``S3IO``
  with a 64 KiB buffer: the default 16 MiB read buffer would pull a third of a ResNet-18 update
  to look at its first kilobyte;
* the **data** — read whole once the file is accepted, to check values and encode.

The header-only path is :func:`flstore_core.data.rawfile.read_raw_header`, which shares the
codec's validating header parser, so both paths accept and reject exactly the same files.
"""

from __future__ import annotations

from typing import IO, Any

from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    ScratchBuffer,
    update_from_metadata,
)
from flstore_core.data.rawfile import RAW_SUFFIX, check_identity, header_specs, read_raw_header
from flstore_core.errors import WrongJobError
from flstore_core.ids import validate_job
from pipelines.records import RawHeader

HEADER_PROBE = 64 * 1024
DATA_BUFFER = 16 * 1024 * 1024
_GLOB = set("*?[")


def source_pattern(src: str) -> str:
    """The file pattern of a source: a glob as given, a single file, or every ``*.safetensors``
    under a directory or prefix (recursively)."""
    if _GLOB & set(src) or src.endswith(RAW_SUFFIX):
        return src
    return src.rstrip("/") + "/**" + RAW_SUFFIX


def parse_header(
    path: str,
    read: Any,
    size: int,
    *,
    job: str | None = None,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> RawHeader:
    """Validate the header of a raw file of ``size`` bytes; ``read(n)`` reads from its start.

    ``job`` (``--job``) fills in a missing ``job`` field and must match a present one. Raises
    a :class:`ValidationError` subclass whose message is the dead-letter reason.
    """
    raw = read_raw_header(read, size, limits)
    meta = dict(raw.metadata)
    if job is not None:
        claimed = meta.get("job")
        if claimed is None:
            meta["job"] = job
        elif claimed != job:
            raise WrongJobError(f"the file belongs to job {claimed!r}, not to {job!r}")
    update = update_from_metadata({}, meta)
    check_identity(update)
    assert update.job is not None
    return RawHeader(
        path=path,
        size=size,
        kind=update.kind,
        job=validate_job(update.job),
        round=update.round,
        client=update.client,
        specs=header_specs(raw.header.entries, meta),
        num_examples=update.num_examples,
        metrics=update.metrics,
    )


class RawFileReader:
    """Opens raw files through Beam's filesystems; one per DoFn instance (made in ``setup``).

    ``s3_options`` are Beam's S3 options as a dict (``runtime.beam_s3_options``): workers of a
    remote runner get them from the DoFn, not from the launching process.
    """

    def __init__(self, s3_options: dict[str, Any] | None = None) -> None:
        self.s3_options = dict(s3_options or {})
        self._s3io: Any = None

    def _s3(self) -> Any:
        if self._s3io is None:
            from apache_beam.io.aws.s3io import S3IO

            self._s3io = S3IO(options=self.s3_options)
        return self._s3io

    def open(self, path: str, buffer_size: int = DATA_BUFFER) -> IO[bytes]:
        if path.startswith("s3://"):
            return self._s3().open(path, "rb", read_buffer_size=buffer_size)  # type: ignore[no-any-return]
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.open(
            path,
            mime_type="application/octet-stream",
            compression_type=CompressionTypes.UNCOMPRESSED,
        )

    def header(
        self,
        path: str,
        size: int,
        job: str | None = None,
        limits: CodecLimits = DEFAULT_LIMITS,
    ) -> RawHeader:
        """The validated header of ``path`` (``size`` from the match metadata)."""
        with self.open(path, HEADER_PROBE) as fh:
            return parse_header(path, fh.read, size, job=job, limits=limits)

    def read(self, path: str) -> bytes:
        """The whole file."""
        with self.open(path) as fh:
            return fh.read()

    def read_into(self, path: str, scratch: ScratchBuffer, size: int) -> memoryview:
        """The whole file, in ``scratch``'s memory (valid until its next use): a fresh 47 MB
        ``bytes`` per file costs ~11,000 page faults (29 ms a ResNet-18 update against 25 ms
        into a fresh numpy buffer, less into one already mapped). ``size`` (the matched size)
        is where it expects the end; a file that has grown since is still read whole."""
        with self.open(path) as fh:
            buf = memoryview(scratch.take(size + 1))  # type: ignore[arg-type]
            n = 0
            while n < len(buf):
                # Beam's local and S3 files are io.BufferedReaders, which IO[bytes] does not say
                got = fh.readinto(buf[n:])  # type: ignore[attr-defined]
                if not got:
                    return buf[:n]
                n += got
            return memoryview(buf.tobytes() + fh.read())  # grown past ``size``: rare

    def close(self) -> None:
        self._s3io = None
