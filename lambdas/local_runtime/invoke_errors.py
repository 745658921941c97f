"""The error responses of the local Lambda Invoke API, shaped the way botocore reads them.

Why a module of their own: the instance pool refuses an invocation (throttling), the endpoint
refuses an unknown function and the HTTP server refuses a malformed request, and all three must
answer with the same error shape. botocore's ``rest-json`` parser takes the error code from the
``x-amzn-ErrorType`` header and the message from ``Message``/``message`` in the JSON body, so
with these boto3 raises its modelled exception classes (``ResourceNotFoundException``, ...).
"""

from __future__ import annotations

from typing import Any


class InvokeApiError(Exception):
    """An Invoke API error response: HTTP status, botocore error code and JSON body."""

    def __init__(self, status: int, error_type: str, body: dict[str, Any]) -> None:
        super().__init__(body.get("Message") or body.get("message") or error_type)
        self.status = status
        self.error_type = error_type
        self.body = body

    @classmethod
    def not_found(cls, arn: str) -> InvokeApiError:
        """The function does not exist (404 ``ResourceNotFoundException``)."""
        return cls(
            404,
            "ResourceNotFoundException",
            {"Type": "User", "Message": f"Function not found: {arn}"},
        )

    @classmethod
    def throttled(cls) -> InvokeApiError:
        """Reserved concurrency exhausted (429 ``TooManyRequestsException``)."""
        body = {
            "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
            "Type": "User",
            "message": "Rate Exceeded.",
        }
        return cls(429, "TooManyRequestsException", body)

    @classmethod
    def too_large(cls, limit: int) -> InvokeApiError:
        """Request payload over the limit (413 ``RequestTooLargeException``)."""
        message = f"Request must be smaller than {limit} bytes for the InvokeFunction operation"
        return cls(413, "RequestTooLargeException", {"Type": "User", "message": message})

    @classmethod
    def invalid_parameter(cls, message: str) -> InvokeApiError:
        """A malformed request parameter (400 ``InvalidParameterValueException``)."""
        return cls(400, "InvalidParameterValueException", {"Type": "User", "message": message})

    @classmethod
    def invalid_content(cls, message: str) -> InvokeApiError:
        """A payload that is not JSON (400 ``InvalidRequestContentException``)."""
        return cls(400, "InvalidRequestContentException", {"Type": "User", "message": message})
