"""What browsers need from the write routes: CORS (every answer, and the preflight) and the image
beacon (``GET ...?data=<base64 event>`` answered with a 1x1 GIF). Pure: headers in, headers out."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from streamapp.api.errors import INVALID_JSON, TOO_LARGE, ApiError

#: Milliseconds the server spent on a write request (on every answer of the write routes).
SERVER_TIME_HEADER = "X-Streamapp-Server-Ms"
#: On every answer of the write routes (errors too), so a browser SDK can read the error.
CORS_ANSWER_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After, " + SERVER_TIME_HEADER,
}

#: A 1x1 transparent GIF: the image beacon's answer (the SDK checks that the image has a size).
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
#: Request headers a browser may send to the write routes (Keen's SDKs send ``keen-sdk``).
CORS_ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "content-encoding",
        "keen-sdk",
        "accept",
        "accept-language",
        "cache-control",
        "pragma",
        "x-requested-with",
    }
)
CORS_MAX_AGE_SECONDS = 86400


def preflight_headers(request_headers: Mapping[str, str]) -> dict[str, str]:
    """The answer to a CORS preflight: the requested headers that are in the allow-list (always
    Authorization and Content-Type), the write methods, and a day of caching."""
    allowed = ["Authorization", "Content-Type"]
    requested = request_headers.get("Access-Control-Request-Headers", "")
    for name in requested.split(",")[:32]:
        name = name.strip().lower()
        if name in CORS_ALLOWED_HEADERS and name not in ("authorization", "content-type") and name not in allowed:
            allowed.append(name)
    return {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": ", ".join(allowed),
        "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS),
        "Vary": "Access-Control-Request-Headers",
    }


def decode_beacon_data(data: str | None, max_body_bytes: int) -> bytes:
    """The event JSON of an image beacon's ``data`` parameter (base64, standard or URL-safe; the
    query string is already URL-decoded). ApiError 400 when missing or not base64, 413 when too big."""
    if not data:
        raise ApiError(400, INVALID_JSON, "the image beacon needs a 'data' parameter: base64 of the event JSON")
    if len(data) > (max_body_bytes + 2) // 3 * 4 + 4:
        raise ApiError(413, TOO_LARGE, f"the 'data' parameter decodes to over the {max_body_bytes} byte limit")
    # A '+' sent without URL-encoding arrives as a space.
    text = data.strip().replace(" ", "+")
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text.encode("ascii"))
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ApiError(400, INVALID_JSON, "the 'data' parameter is not valid base64") from None
