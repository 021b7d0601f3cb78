"""Keen's error answers: ``{"message": ..., "error_code": ...}`` with the HTTP status, and Keen's
error names. Raised by the write API's checks (in the parse process too) and by the admin API."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson


class ApiError(Exception):
    """An HTTP error answer in Keen's shape: ``{"message": ..., "error_code": ...}``."""

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> bytes:
        return error_body(self.message, self.error_code, **self.extra)

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the parse process too (see plan_request): rebuild with all fields in the parent.
        return (ApiError, (self.status, self.error_code, self.message), {"headers": self.headers, "extra": self.extra})


def error_body(message: str, error_code: str, **extra: Any) -> bytes:
    return orjson.dumps({"message": message, "error_code": error_code, **extra})


# Keen's error names (``error_code`` of a request error, ``error.name`` of a per-event error).
INVALID_API_KEY = "InvalidApiKeyError"
NOT_FOUND = "ResourceNotFoundError"
INVALID_EVENT = "InvalidEventError"
INVALID_COLLECTION = "InvalidCollectionNameError"
INVALID_JSON = "InvalidJsonError"
INVALID_PROJECT_ID = "InvalidProjectIdError"
TOO_LARGE = "RequestEntityTooLargeError"
EVENT_TOO_LARGE = "EventTooLargeError"
TOO_MANY_REQUESTS = "TooManyRequestsError"
UNAVAILABLE = "ServiceUnavailableError"
REQUEST_TIMEOUT = "RequestTimeoutError"
UNSUPPORTED_ENCODING = "UnsupportedContentEncodingError"


def unavailable(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, UNAVAILABLE, message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})
