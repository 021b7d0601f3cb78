"""Which S3 errors are one tenant's problem and which are everybody's (pure, no I/O).

A project can export to its own bucket (``ProjectSettings.bucket``). When that bucket is
deleted, its policy revoked or its KMS key disabled, retrying cannot help until the tenant
fixes it, and retrying in place holds upload slots, the pending-bytes budget and the
partition's commit point of every other project. Such errors are *tenant* errors: the sink
parks the object (``streamapp.sink.parking``) and moves on. Everything that can hit any
destination (throttling, 5xx, timeouts, connection errors, the service's own credentials or
clock) is *transient*: pause and retry, as before.
"""

from __future__ import annotations

from enum import StrEnum

from botocore.exceptions import ClientError


class ErrorKind(StrEnum):
    TRANSIENT = "transient"  # retry in place: it affects (or may affect) every destination
    TENANT = "tenant"  # only this destination fails until its owner fixes it: park


#: Codes that say the destination itself is unusable: missing, forbidden, in another region,
#: or its encryption key unusable.
TENANT_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidBucketName",
        "InvalidBucketState",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",  # bucket in another region than the one we sign for
        "IllegalLocationConstraintException",
        "InvalidAccessPointARN",
        "KMS.DisabledException",
        "KMS.NotFoundException",
        "KMS.KMSInvalidStateException",
        "KMS.AccessDeniedException",
        "KMS.InvalidKeyUsageException",
        "KMSInvalidStateException",
        "KMSNotFoundException",
        "KMSDisabledException",
        "NoSuchKMSKey",
        "InvalidEncryptionAlgorithmError",
        "ObjectLockConfigurationNotFoundError",
        "MethodNotAllowed",
    }
)

#: Codes that can hit every destination: throttling, server trouble, and problems of the
#: service's own credentials or clock (parking cannot help with those: the quarantine is
#: written with the same credentials).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "KMS.ThrottlingException",
        "KMS.KMSInternalException",
    }
)


def classify_s3_error(code: str | None, status: int | None) -> ErrorKind:
    """The kind of a failed S3 call from its error code and HTTP status (either may be unknown).

    Known codes decide first; then the status: 429 and 5xx are transient, any other 4xx
    (403 and 404 above all) is the destination's; no status (a network error) is transient.
    A ``KMS.`` code not listed is the tenant's key unless it says throttling or internal.
    """
    if code:
        if code in TENANT_CODES:
            return ErrorKind.TENANT
        if code in TRANSIENT_CODES:
            return ErrorKind.TRANSIENT
        if code.startswith("KMS") and not any(word in code for word in ("Throttl", "Internal", "Unavailable")):
            return ErrorKind.TENANT
    if status is None:
        return ErrorKind.TRANSIENT
    if status == 429 or status >= 500:
        return ErrorKind.TRANSIENT
    if 300 <= status < 500:
        return ErrorKind.TENANT
    return ErrorKind.TRANSIENT


def error_code_and_status(exc: BaseException) -> tuple[str | None, int | None]:
    """(code, HTTP status) of a botocore ClientError; (None, None) for anything else."""
    if not isinstance(exc, ClientError):
        return None, None
    response = exc.response if isinstance(exc.response, dict) else {}
    error = response.get("Error") or {}
    code = error.get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if not isinstance(status, int):
        try:
            status = int(code) if isinstance(code, str) and code.isdigit() else None
        except ValueError:
            status = None
    return (str(code) if code else None), status


def classify_exception(exc: BaseException) -> tuple[ErrorKind, str]:
    """(kind, one-line reason) of any exception raised by an S3 call."""
    code, status = error_code_and_status(exc)
    if code is None and status is None:
        return ErrorKind.TRANSIENT, f"{type(exc).__name__}: {exc}"[:300]
    message = ""
    if isinstance(exc, ClientError):
        message = str((exc.response.get("Error") or {}).get("Message") or "")
    reason = f"{code or 'HTTP'} ({status if status is not None else '?'})" + (f": {message}" if message else "")
    return classify_s3_error(code, status), reason[:300]


class DestinationError(Exception):
    """An S3 call failed with a tenant error (see ``classify_s3_error``): park, do not retry in place."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
