"""The S3 blob store: FLStore's durable backend, through one boto3 client."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from botocore.exceptions import BotoCoreError, ClientError

from flstore_core.errors import UnavailableError
from flstore_core.storage.blobs import BlobInfo, BlobStream, Buffer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3BlobStore:
    """Blobs in one S3 bucket; S3's refusals become :class:`UnavailableError` naming the key."""

    def __init__(self, bucket: str, client: S3Client) -> None:
        self.bucket = bucket
        self.client = client

    def get(self, key: str) -> Buffer | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = obj["Body"].read()
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise UnavailableError(f"S3 refused GET {key}: {error_code(exc)}") from exc
        return data

    def open(self, key: str) -> BlobStream | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise UnavailableError(f"S3 refused GET {key}: {error_code(exc)}") from exc
        return S3Stream(key, obj["Body"])

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
        }
        if tags:
            kwargs["Tagging"] = urlencode(dict(tags))
        try:
            self.client.put_object(**kwargs)
        except ClientError as exc:
            raise UnavailableError(f"S3 refused PUT {key}: {error_code(exc)}") from exc

    def head(self, key: str) -> BlobInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise UnavailableError(f"S3 refused HEAD {key}: {error_code(exc)}") from exc
        return BlobInfo(
            key,
            int(head.get("ContentLength", -1)),
            str(head.get("ETag", "")).strip('"'),
            str(head.get("LastModified") or ""),
        )

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        for page in self._pages(prefix, None):
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

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            raise UnavailableError(f"S3 refused DELETE {key}: {error_code(exc)}") from exc

    def prepare(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


class S3Stream:
    """An S3 object's body (botocore's ``StreamingBody``) read in pieces; a connection lost
    or cut short mid-read is an :class:`UnavailableError` naming the key, as a refused GET is."""

    def __init__(self, key: str, body: Any) -> None:
        self.key = key
        self.body = body

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self.body.read(None if size < 0 else size)
        except BotoCoreError as exc:  # ReadTimeoutError, IncompleteReadError, ...
            raise UnavailableError(f"S3 GET {self.key} failed while reading: {exc}") from exc
        return data

    def close(self) -> None:
        self.body.close()


def error_code(exc: ClientError) -> str:
    """The S3 error code of a botocore error (``NoSuchKey``, ``AccessDenied``, …)."""
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))
