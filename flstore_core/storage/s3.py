"""The S3 blob store: FLStore's durable backend, through one boto3 client.

Every PUT carries the SHA-256 of its body (``ChecksumAlgorithm="SHA256"``: botocore computes
it, S3 refuses a body that does not match and keeps it with the object), and every whole-object
GET asks for it back (``ChecksumMode="ENABLED"``) and checks the bytes it hands out against it
(:class:`S3Stream`), so an object changed at rest, or written around FLStore without that
checksum matching, is a 503 ``stored_object_corrupt`` (:mod:`.verified`), never served. A
ranged GET has no checksum to check (S3 returns none for a range); the readers of ranges, an
update's frames, check each frame's digest from the manifest instead. A result composed by a
multipart upload carries a CRC32 of its whole bytes (S3 keeps a SHA-256 of a multipart object
only as a checksum of its parts' checksums), checked the same way. An object written without
either (before FLStore sent one) is served unchecked at this layer.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

from flstore_core.errors import PreconditionFailedError, UnavailableError
from flstore_core.storage.blobs import BlobInfo, BlobStream, Buffer
from flstore_core.storage.verified import checksum_mismatch, stored_object_corrupt

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MISSING = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
# reads of one object's body: the first and the resumptions after it was cut short
READ_ATTEMPTS = 4
# S3's smallest part of a multipart upload but the last
MIN_PART_BYTES = 5 * 1024 * 1024


class S3BlobStore:
    """Blobs in one S3 bucket; S3's refusals become :class:`UnavailableError` naming the key."""

    def __init__(self, bucket: str, client: S3Client) -> None:
        self.bucket = bucket
        self.client = client

    def get(self, key: str) -> Buffer | None:
        stream = self.open(key)
        if stream is None:
            return None
        try:
            return stream.read()
        finally:
            stream.close()

    def open(self, key: str) -> BlobStream | None:
        obj = self._get_object(key, ChecksumMode="ENABLED")
        if obj is None:
            return None
        etag = str(obj.get("ETag", ""))
        stored = str(obj.get("ChecksumSHA256") or "")

        def rest(offset: int) -> Any:
            """The body from ``offset`` on, of the same version of the object (``If-Match``:
            a rewritten object is S3's 412, an UnavailableError, never a splice of two)."""
            if offset >= int(obj.get("ContentLength", -1)) >= 0:
                return io.BytesIO(b"")
            again = self._get_object(key, Range=f"bytes={offset}-", **_if_match(etag))
            if again is None:
                raise UnavailableError(f"S3 GET {key}: the object went away while it was read")
            return again["Body"]

        # "-N": a multipart object's checksum of its parts' checksums, not of the bytes; a
        # composed result carries a CRC32 of its whole bytes instead (``compose``)
        whole_crc32 = obj.get("ChecksumType") == "FULL_OBJECT" and obj.get("ChecksumCRC32")
        return S3Stream(
            key,
            obj["Body"],
            rest,
            sha256=None if "-" in stored else stored or None,
            crc32=str(whole_crc32) if whole_crc32 and not stored else None,
        )

    def _get_object(self, key: str, **extra: Any) -> Any:
        """``GetObject`` (None for a missing key); S3's refusals, and connection failures
        botocore's retries did not overcome, are :class:`UnavailableError` (a 503)."""
        try:
            obj: Any = self.client.get_object(Bucket=self.bucket, Key=key, **extra)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise UnavailableError(f"S3 refused GET {key}: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"S3 GET {key} failed: {exc}") from exc
        return obj

    def get_range(self, key: str, start: int, end: int) -> Buffer | None:
        """A ranged GET (``Range: bytes=start-(end-1)``, RFC 9110 §14.1.2)."""
        if not 0 <= start < end:
            return b""
        for attempt in range(READ_ATTEMPTS):
            try:
                obj = self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
                )
            except ClientError as exc:
                if error_code(exc) in _MISSING:
                    return None
                if error_code(exc) == "InvalidRange":  # start past the end of the object
                    return b""
                raise UnavailableError(f"S3 refused GET {key} (range): {error_code(exc)}") from exc
            except BotoCoreError as exc:
                raise UnavailableError(f"S3 GET {key} (range) failed: {exc}") from exc
            try:
                data: bytes = obj["Body"].read()
                return data
            except BotoCoreError as exc:  # the body cut short: botocore does not retry that
                if attempt + 1 == READ_ATTEMPTS:
                    raise UnavailableError(
                        f"S3 GET {key} (range) failed while reading: {exc}"
                    ) from exc
        raise AssertionError("unreachable")

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
        sha256_b64: str | None = None,
    ) -> None:
        """A PUT; a conditional one is S3's conditional write (``If-None-Match: *`` creates
        only, ``If-Match`` replaces only that version), atomic in S3 itself. A given
        ``sha256_b64`` goes out as ``x-amz-checksum-sha256``, which botocore then does not
        compute (hashing a 41 MB stored update measured ~40 ms through its file-like reads);
        S3 refuses a body that does not match it (``BadDigest``)."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
            "ChecksumAlgorithm": "SHA256",
        }
        if sha256_b64:
            kwargs["ChecksumSHA256"] = sha256_b64
        if tags:
            kwargs["Tagging"] = urlencode(dict(tags))
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        try:
            self.client.put_object(**kwargs)
        except ClientError as exc:
            code = error_code(exc)
            # 409 ConditionalRequestConflict: a concurrent conditional write to the same key
            if code in _PRECONDITION or (if_match is not None and code in _MISSING):
                raise PreconditionFailedError(f"S3 PUT {key}: condition failed ({code})") from exc
            raise UnavailableError(f"S3 refused PUT {key}: {code}") from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"S3 PUT {key} failed: {exc}") from exc

    def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """One multipart upload: a part of at least S3's minimum part size is copied
        server-side (``UploadPartCopy``); smaller ones are read and joined with their
        neighbours until they reach it (the last part may be smaller). So nothing holds more
        than the minimum part size plus one part, and a composition smaller than the minimum
        is one PUT."""
        sizes = []
        for part in parts:
            info = self.head(part)
            if info is None:
                raise UnavailableError(f"cannot compose {key}: part {part} does not exist")
            sizes.append(info.size)
        if sum(sizes) < MIN_PART_BYTES or (len(parts) == 1 and sizes[0] < MIN_PART_BYTES):
            self.put(
                key,
                b"".join(self._must_get(p) for p in parts),
                content_type=content_type,
                tags=tags,
            )
            return
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "ContentType": content_type,
            # S3 keeps a CRC32 of the whole object's bytes (SHA-256 it keeps only per part),
            # which every whole-object GET then checks
            "ChecksumAlgorithm": "CRC32",
            "ChecksumType": "FULL_OBJECT",
        }
        if tags:
            kwargs["Tagging"] = urlencode(dict(tags))
        try:
            upload = self.client.create_multipart_upload(**kwargs)["UploadId"]
        except ClientError as exc:
            raise UnavailableError(
                f"S3 refused a multipart upload of {key}: {error_code(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"S3 multipart upload of {key} failed: {exc}") from exc
        target: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload}
        try:
            done = self._send_parts(target, parts, sizes)
            self.client.complete_multipart_upload(**target, MultipartUpload={"Parts": done})
        except (ClientError, BotoCoreError, UnavailableError) as exc:
            with contextlib.suppress(ClientError, BotoCoreError):  # S3 expires it otherwise
                self.client.abort_multipart_upload(**target)
            if isinstance(exc, UnavailableError):
                raise
            if isinstance(exc, BotoCoreError):
                raise UnavailableError(f"S3 composing {key} failed: {exc}") from exc
            raise UnavailableError(f"S3 refused composing {key}: {error_code(exc)}") from exc

    def _send_parts(
        self, target: dict[str, Any], parts: Sequence[str], sizes: Sequence[int]
    ) -> list[Any]:
        """The parts of one multipart upload, in order: a part of at least the minimum size
        copied server-side, smaller ones joined with their neighbours until they reach it."""
        done: list[Any] = []
        pending = bytearray()
        for part, size in zip(parts, sizes, strict=True):
            if not pending and size >= MIN_PART_BYTES:
                copied = self.client.upload_part_copy(
                    **target,
                    PartNumber=len(done) + 1,
                    CopySource={"Bucket": self.bucket, "Key": part},
                )
                result = copied["CopyPartResult"]
                number = len(done) + 1
                done.append({"PartNumber": number, "ETag": result["ETag"], **_part_crc32(result)})
                continue
            pending += self._must_get(part)
            if len(pending) >= MIN_PART_BYTES:
                done.append(self._upload_part(target, len(done) + 1, pending))
                pending = bytearray()
        if pending:
            done.append(self._upload_part(target, len(done) + 1, pending))
        return done

    def _upload_part(self, target: dict[str, Any], number: int, body: bytearray) -> dict[str, Any]:
        """One uploaded part of a composition, with its CRC32 (a full-object CRC32 upload
        needs every part's)."""
        sent = self.client.upload_part(
            **target, PartNumber=number, Body=bytes(body), ChecksumAlgorithm="CRC32"
        )
        return {"PartNumber": number, "ETag": sent["ETag"], "ChecksumCRC32": sent["ChecksumCRC32"]}

    def _must_get(self, key: str) -> bytes:
        data = self.get(key)
        if data is None:
            raise UnavailableError(f"part {key} disappeared while composing")
        return bytes(data)

    def head(self, key: str) -> BlobInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise UnavailableError(f"S3 refused HEAD {key}: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"S3 HEAD {key} failed: {exc}") from exc
        return BlobInfo(
            key,
            int(head.get("ContentLength", -1)),
            str(head.get("ETag", "")).strip('"'),
            str(head.get("LastModified") or ""),
        )

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        for page in self._pages(prefix, delimiter):
            for item in page.get("Contents", []):
                yield BlobInfo(
                    str(item["Key"]),
                    int(item.get("Size", -1)),
                    str(item.get("ETag", "")).strip('"'),
                    str(item.get("LastModified") or ""),
                )

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        for page in self._pages(prefix, delimiter):
            for common in page.get("CommonPrefixes", []):
                yield str(common["Prefix"])

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[Any]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)
        except ClientError as exc:
            raise UnavailableError(f"S3 refused LIST {prefix}: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"S3 LIST {prefix} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            raise UnavailableError(f"S3 refused DELETE {key}: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"S3 DELETE {key} failed: {exc}") from exc

    def prepare(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    """A running CRC32 with hashlib's interface (S3's ``ChecksumCRC32``: big-endian bytes)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class S3Stream:
    """An S3 object's body (botocore's ``StreamingBody``) read in pieces.

    botocore retries a request whose answer never came, but not a body cut short once the
    answer began (a connection reset mid-transfer, a read timeout, ``IncompleteReadError``):
    with ``rest`` (the body from an offset on, of the same version), such a read goes on from
    where it stopped, at most :data:`READ_ATTEMPTS` - 1 times in all; past that, or without
    ``rest``, it is an :class:`UnavailableError` naming the key, as a refused GET is.

    With ``sha256`` or ``crc32`` (the object's stored checksum of its whole bytes, base64),
    the bytes handed out are hashed and checked against it at the end of the body: the
    resumptions are ranged GETs, which S3 sends without a checksum, so botocore's own check
    (:class:`FlexibleChecksumError`) covers only a body read in one go."""

    def __init__(
        self,
        key: str,
        body: Any,
        rest: Callable[[int], Any] | None = None,
        *,
        sha256: str | None = None,
        crc32: str | None = None,
    ) -> None:
        self.key = key
        self.body = body
        self._rest = rest
        self._offset = 0  # bytes handed out so far
        self._resumed = 0
        self._stored = sha256 or crc32
        self._algorithm = "sha256" if sha256 else "crc32"
        self._hash: _Digest | None = None
        if sha256:
            self._hash = hashlib.sha256()
        elif crc32:
            self._hash = _Crc32()

    def read(self, size: int = -1, /) -> bytes:
        while True:
            try:
                data: bytes = self.body.read(None if size < 0 else size)
            except FlexibleChecksumError as exc:  # botocore's check of a body read in one go
                raise stored_object_corrupt(self.key, f"checksum mismatch: {exc}") from exc
            except BotoCoreError as exc:  # ReadTimeoutError, IncompleteReadError, ...
                if self._rest is None or self._resumed + 1 >= READ_ATTEMPTS:
                    raise UnavailableError(
                        f"S3 GET {self.key} failed while reading: {exc}"
                    ) from exc
                self._resumed += 1
                with contextlib.suppress(Exception):
                    self.body.close()
                self.body = self._rest(self._offset)
                continue
            self._offset += len(data)
            self._check(data, at_end=size < 0 or (not data and size != 0))
            return data

    def _check(self, data: bytes, *, at_end: bool) -> None:
        if self._hash is None or self._stored is None:
            return
        self._hash.update(data)
        if at_end:
            actual = base64.b64encode(self._hash.digest()).decode()
            self._hash = None  # checked once
            if actual != self._stored:
                raise checksum_mismatch(self.key, self._stored, actual, self._algorithm)

    def close(self) -> None:
        self.body.close()


def _part_crc32(copied: Mapping[str, Any]) -> dict[str, str]:
    """A copied part's CRC32 as ``CompleteMultipartUpload`` takes it, where S3 returned one."""
    crc = copied.get("ChecksumCRC32")
    return {"ChecksumCRC32": str(crc)} if crc else {}


def _if_match(etag: str) -> dict[str, str]:
    return {"IfMatch": etag} if etag else {}


def error_code(exc: ClientError) -> str:
    """The S3 error code of a botocore error (``NoSuchKey``, ``AccessDenied``, …)."""
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))
