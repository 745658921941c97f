"""Raw update files: what an FL server or client hands to ingestion (ARCHITECTURE §2).

A raw file is an uncompressed safetensors file whose ``__metadata__`` holds ``job``, ``round``,
``client``, ``num_examples`` and ``metrics``; ``kind`` ``global`` omits the client and
``initial`` omits client and round. The writer (:func:`write_raw_update`), the whole-file reader
(:func:`read_raw_update`) and the header-only reader ingestion validates with
(:func:`read_raw_header`) accept and reject exactly the same files: they share the codec's
validating header parser and :func:`check_identity`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    Header,
    HeaderEntry,
    TensorSpec,
    Update,
    header_length,
    parse_header,
    parse_safetensors,
    serialize,
    update_from_metadata,
)
from flstore_core.errors import CorruptUpdateError, TruncatedFileError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round

RAW_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class RawFileHeader:
    """A raw file's validated header: its entries, and its identity and metrics as an
    :class:`Update` without tensors (identity not yet checked: a caller may fill in the job)."""

    header: Header
    identity: Update

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata


def read_raw_header(
    read: Callable[[int], bytes], size: int, limits: CodecLimits = DEFAULT_LIMITS
) -> RawFileHeader:
    """Validate the header of a raw file of ``size`` bytes; ``read(n)`` reads from its start.

    Only the 8-byte length and the JSON header are read, so a file is checked before any of its
    data is. A file cut short — inside its header, or before the end of the data its header
    describes — raises :class:`TruncatedFileError`; any other malformation the codec's error.
    """
    prefix = read(8)
    n = header_length(prefix, limits, size)
    head = read(n)
    if len(head) != n:
        raise TruncatedFileError(f"truncated: the file ends inside its {n}-byte header")
    try:
        header = parse_header(head, size, limits)
    except CorruptUpdateError:
        loose = _parse_without_size(head, limits)
        if loose is not None:
            expected = 8 + n + max((e.end for e in loose.entries), default=0)
            if size < expected:
                raise TruncatedFileError(
                    f"truncated: the file has {size} bytes, its header describes {expected}"
                ) from None
        raise
    return RawFileHeader(header, update_from_metadata({}, dict(header.metadata)))


def _parse_without_size(head: bytes, limits: CodecLimits) -> Header | None:
    try:
        return parse_header(head, None, limits)
    except CorruptUpdateError:
        return None


def header_specs(
    entries: Iterable[HeaderEntry], metadata: dict[str, str]
) -> tuple[TensorSpec, ...]:
    """Tensor specs as :meth:`Update.specs` reports them once the data is parsed: BF16 (and F16
    written with ``precision=float16``) widen to F32 on read."""
    widened_f16 = metadata.get("precision") == "float16"
    out = []
    for e in entries:
        dtype = e.dtype
        if dtype == "BF16" or (dtype == "F16" and widened_f16):
            dtype = "F32"
        out.append(TensorSpec(e.name, dtype, tuple(e.shape)))
    return tuple(out)


def write_raw_update(update: Update, path: str | None = None) -> bytes:
    """Bytes (and optionally a file) of a raw update file, the ingestion interchange format.

    A raw file is an uncompressed safetensors file whose ``__metadata__`` holds ``job``,
    ``round``, ``client``, ``num_examples`` and ``metrics``; ``kind`` ``global`` omits the
    client and ``initial`` omits client and round.
    """
    check_identity(update)
    raw = serialize(update, "float32")
    if path is not None:
        with open(path, "wb") as fh:
            fh.write(raw)
    return raw


def read_raw_update(source: str | bytes, limits: CodecLimits = DEFAULT_LIMITS) -> Update:
    """Read a raw update file (a path or its bytes) and check its identity metadata."""
    if isinstance(source, str):
        with open(source, "rb") as fh:
            source = fh.read()
    update = parse_safetensors(source, limits)
    check_identity(update)
    return update


def check_identity(update: Update) -> None:
    """Require the identity fields a raw update file of its kind must carry."""
    if update.job is None:
        raise ValidationError(
            "raw update file: metadata needs 'job' (its safetensors __metadata__ carries job, "
            "round, client and num_examples; plain checkpoints go in with `flstore push`)"
        )
    validate_job(update.job)
    if update.kind == "update":
        if update.client is None or update.round is None:
            raise ValidationError(
                "raw update file: kind 'update' needs 'client' and 'round' in its safetensors "
                "__metadata__ (with job and num_examples; plain checkpoints go in with "
                "`flstore push`)"
            )
        validate_client(update.client)
        validate_round(update.round)
    elif update.kind == "global":
        if update.round is None or update.client is not None:
            raise ValidationError("raw update file: kind 'global' needs 'round' and no 'client'")
        validate_round(update.round)
    elif update.client is not None or update.round is not None:
        raise ValidationError("raw update file: kind 'initial' has neither 'client' nor 'round'")
