"""Reading a write request's body within bounds: a size limit (declared, received and after
decompression, with a cap on the expansion ratio), a shared in-flight budget of body bytes, and a
read deadline. A refused compressed body is not read to the end (:func:`skip_lingering`)."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from streamapp.api.errors import INVALID_JSON, REQUEST_TIMEOUT, TOO_LARGE, UNSUPPORTED_ENCODING, ApiError, unavailable

#: Bodies up to this size may use headroom above ``api_max_body_bytes_in_flight`` (1/8 of it), so
#: big or slow bodies filling the budget never refuse an ordinary small write.
SMALL_BODY_BYTES = 64 * 1024
#: Content encodings aiohttp decompresses for us (its decompressor works in bounded chunks).
ACCEPTED_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
#: Past its first 256 KiB, a compressed body may not expand more than this: decompression is CPU on
#: the event loop, and a 20 KB gzip bomb would otherwise buy 10 MiB of it (JSON compresses ~5-20x).
MAX_COMPRESSION_RATIO = 50
COMPRESSION_RATIO_FREE_BYTES = 256 * 1024


class BodyBudget:
    """Bytes of request bodies being read (and planned) at once: slow or huge bodies cannot pin
    ``N x api_max_body_bytes`` of memory; small bodies have a reserved headroom so they pass anyway."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.headroom = limit // 8
        self.used = 0

    def reserve(self, n: int) -> bool:
        cap = self.limit + (self.headroom if n <= SMALL_BODY_BYTES else 0)
        if self.used + n > cap:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


async def read_request_body(
    request: web.Request, budget: BodyBudget, limit: int, timeout_seconds: float
) -> tuple[bytes, int]:
    """The (decompressed) body and the bytes it holds of the budget; the caller releases them.

    Refusals cost nothing else: 413 over the size limit (declared, received or decompressed),
    503 when the in-flight budget is full, 408 past the read deadline, 415 for an encoding
    aiohttp does not decompress for us.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ACCEPTED_ENCODINGS:
        raise ApiError(415, UNSUPPORTED_ENCODING, "Content-Encoding must be gzip, deflate or identity")
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, TOO_LARGE, f"request body of {length} bytes is over the {limit} byte limit")
    # Content-Length is the size on the wire: the decompressed body is counted as it arrives.
    declared = length if length is not None and encoding in ("", "identity") else None
    reserved = 0
    if declared is not None:
        if not budget.reserve(declared):
            raise unavailable("too many request bodies are being received at once; retry")
        reserved = declared
    # A body already received whole (the common case of a small write) cannot stall: no timer.
    deadline: contextlib.AbstractAsyncContextManager[object] = (
        contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(timeout_seconds)
    )
    try:
        async with deadline:
            if declared is not None:
                try:
                    return await request.content.readexactly(declared), reserved
                except asyncio.IncompleteReadError:
                    raise ApiError(400, INVALID_JSON, "request body is shorter than its Content-Length") from None
            chunks: list[bytes] = []
            content = request.content
            while chunk := await content.readany():
                if reserved + len(chunk) > limit:
                    raise ApiError(413, TOO_LARGE, f"request body is over the {limit} byte limit")
                wire = content.total_compressed_bytes
                if wire and reserved > COMPRESSION_RATIO_FREE_BYTES and reserved > MAX_COMPRESSION_RATIO * wire:
                    raise ApiError(
                        413,
                        TOO_LARGE,
                        f"request body expands more than {MAX_COMPRESSION_RATIO}x when decompressed; "
                        "send it uncompressed or in smaller batches",
                    )
                if not budget.reserve(len(chunk)):
                    raise unavailable("too many request bodies are being received at once; retry")
                reserved += len(chunk)
                chunks.append(chunk)
            return b"".join(chunks), reserved
    except TimeoutError:
        budget.release(reserved)
        raise ApiError(
            408,
            REQUEST_TIMEOUT,
            f"request body not received within {timeout_seconds:g}s",
            headers={"Connection": "close"},
        ) from None
    except (HttpProcessingError, RequestPayloadError) as exc:  # e.g. a body that is not valid gzip
        budget.release(reserved)
        raise ApiError(400, INVALID_JSON, f"request body cannot be decoded: {exc}") from None
    except ConnectionResetError:
        # The client went away mid-body: nobody reads this answer, but it is no server error.
        budget.release(reserved)
        raise ApiError(400, INVALID_JSON, "the connection was closed before the body was complete") from None
    except BaseException:
        budget.release(reserved)
        raise


def skip_lingering(request: web.Request, response: web.Response) -> None:
    """Close the connection after this answer instead of reading the unread (compressed) body.

    aiohttp would otherwise read and inflate what is left of a refused body for up to 10 s to keep
    the connection alive: a 20 KB gzip bomb answered 429 or 413 would still cost 10 MiB of
    inflating on the event loop. (A plain body is left to aiohttp: discarding bytes is cheap, and a
    client still sending would see a reset instead of the answer.) The lingering time is per
    connection, and this connection closes.
    """
    response.force_close()
    protocol = request.protocol
    if protocol is not None and hasattr(protocol, "_lingering_time"):
        protocol._lingering_time = 0.0
