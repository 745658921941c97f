"""Typed errors of FLStore, each mapped to the HTTP status the API answers with.

Every error a user can cause is raised early, before any I/O, with a message that says what to
change. The router turns an :class:`FLStoreError` into ``{"error": {"code", "message"}}`` with
its ``status``; anything else is a bug and the only thing allowed to become a 500.
"""

from __future__ import annotations

from typing import ClassVar


class FLStoreError(Exception):
    """Base of every error FLStore raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The API's error body."""
        return {"error": {"code": self.code, "message": self.message}}


class ValidationError(FLStoreError):
    """Malformed input: a bad id, body, parameter, or update (HTTP 400)."""

    status = 400
    code = "invalid_request"


class InvalidIdError(ValidationError):
    """A job, client or round id outside the grammar of ARCHITECTURE §2."""

    code = "invalid_id"


class InvalidParamsError(ValidationError):
    """Workload parameters that are unknown, of the wrong type or out of bounds."""

    code = "invalid_params"


class CorruptUpdateError(ValidationError):
    """Bytes that are not a well-formed FLStore update (bad frame, header, checksum, values)."""

    code = "corrupt_update"


class MismatchError(ValidationError):
    """An update that disagrees with its round on tensor names, shapes or dtypes."""

    code = "mismatch"


class ConflictError(ValidationError):
    """A write that would change data already committed (a different update in a round, another
    initial or global model, a late client the job does not allow): HTTP 409, the message naming
    what exists."""

    status = 409
    code = "conflict"


class PreconditionFailedError(ConflictError):
    """A conditional write that lost: the object exists (a create) or changed since it was read
    (a rewrite). S3 answers such a PUT with 412; the storage layer turns it into what it means."""


class LimitExceededError(ValidationError):
    """A tensor or file larger than the configured cap."""

    code = "too_large"


class TruncatedFileError(CorruptUpdateError):
    """A file shorter than its header says (an interrupted copy, usually)."""

    code = "truncated"


class NonFiniteError(CorruptUpdateError):
    """A float tensor holding NaN or Inf, found by ingestion (which names it apart)."""

    code = "nonfinite"


class WrongJobError(ValidationError):
    """A raw file that names another job than the one being ingested."""

    code = "wrong_job"


class DuplicateClientError(ValidationError):
    """Two raw files claiming the same client of the same round."""

    code = "duplicate"


class PrecisionConflictError(ValidationError):
    """A storage precision other than the job's."""

    code = "precision"


class AuthenticationError(FLStoreError):
    """No bearer token, or one that is not known (HTTP 401)."""

    status = 401
    code = "unauthorized"


class ForbiddenError(FLStoreError):
    """The token is valid but not granted this job (HTTP 403)."""

    status = 403
    code = "forbidden"


class NotFoundError(FLStoreError):
    """Unknown job, round, client or workload (HTTP 404)."""

    status = 404
    code = "not_found"


class PayloadTooLargeError(FLStoreError):
    """A request body over the API's limit (HTTP 413)."""

    status = 413
    code = "payload_too_large"


class UnavailableError(FLStoreError):
    """No node or backend could answer; the request may be retried (HTTP 503)."""

    status = 503
    code = "unavailable"


class StoredObjectCorruptError(UnavailableError):
    """An object in S3 failed verification; the data is not served (HTTP 503)."""

    code = "stored_object_corrupt"


class OverLimitError(ValidationError):
    """A request whose params imply more memory or time than any plan of the stack gives one
    node or the API's deadline (HTTP 400): the message names the limit and the estimate."""

    code = "over_limit"


class DeadlineExceededError(UnavailableError):
    """A node stopped a workload at the request's deadline (HTTP 503); it is not retried on
    another node, which would meet the same deadline."""

    code = "deadline_exceeded"


class NodeOutOfMemoryError(UnavailableError):
    """A node's invocation ran out of memory (HTTP 503); it is not retried on another node,
    which would run out of memory the same way."""

    code = "out_of_memory"


_BY_CODE: dict[str, type[FLStoreError]] = {}


def _index(cls: type[FLStoreError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(FLStoreError)


def error_from_dict(body: object, status: int | None = None) -> FLStoreError:
    """Rebuild the typed error from an API error body (used by the client SDK and the router)."""
    code, message = "internal", "unexpected error"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", code))
        message = str(body["error"].get("message", message))
    cls = _BY_CODE.get(code)
    if cls is None:
        by_status = {c.status: c for c in reversed(list(_BY_CODE.values()))}
        cls = by_status.get(status or 500, FLStoreError)
    return cls(message)
