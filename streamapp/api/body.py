"""Reading a write request's body within bounds: a size limit (declared, received and after
decompression, with a cap on the expansion ratio), a shared in-flight budget of body bytes, and a
read deadline.

Compressed bodies are inflated here, not by aiohttp: the worker's web server has aiohttp's
decompression off (:mod:`streamapp.infra.web_server`). aiohttp inflates a body inside the
protocol's ``data_received``, and whenever a read resumes the paused protocol it inflates on
until the reader's buffer is full again, so one read of a 200 KB gzip bomb inflated all of its
10 MiB in one event-loop step (25-44 ms here), and every honest request waited behind it.
:func:`inflate` works in steps of :data:`INFLATE_STEP_BYTES` and yields to the loop between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from streamapp.api.errors import INVALID_JSON, REQUEST_TIMEOUT, TOO_LARGE, UNSUPPORTED_ENCODING, ApiError, unavailable

#: Bodies up to this size may use headroom above ``api_max_body_bytes_in_flight`` (1/8 of it), so
#: big or slow bodies filling the budget never refuse an ordinary small write.
SMALL_BODY_BYTES = 64 * 1024
#: Content encodings this module inflates (``inflate``); any other is refused with 415.
IDENTITY_ENCODINGS = frozenset({"", "identity"})
GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
ACCEPTED_ENCODINGS = IDENTITY_ENCODINGS | GZIP_ENCODINGS | {"deflate"}
#: Past its first 256 KiB, a compressed body may not expand more than this: decompression is CPU on
#: the event loop, and a 20 KB gzip bomb would otherwise buy 10 MiB of it (JSON compresses ~5-20x).
MAX_COMPRESSION_RATIO = 50
COMPRESSION_RATIO_FREE_BYTES = 256 * 1024
#: Bodies of this size or more are joined from their chunks in a thread (:func:`join`).
JOIN_IN_THREAD_BYTES = 1024 * 1024
#: Decompressed bytes per step of :func:`inflate` between yields to the event loop (~0.1 ms of CPU).
INFLATE_STEP_BYTES = 64 * 1024


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


def body_encoding(request: web.Request) -> str:
    """The request's Content-Encoding, lower-cased; 415 for one :func:`inflate` cannot undo."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ACCEPTED_ENCODINGS:
        raise ApiError(415, UNSUPPORTED_ENCODING, "Content-Encoding must be gzip, deflate or identity")
    return encoding


async def read_request_body(
    request: web.Request, budget: BodyBudget, limit: int, timeout_seconds: float
) -> tuple[bytes, int]:
    """The (decompressed) body and the bytes it holds of the budget; the caller releases them.

    Refusals cost nothing else: 413 over the size limit (declared, received or decompressed),
    503 when the in-flight budget is full, 408 past the read deadline, 415 for an encoding
    :func:`inflate` does not undo, 400 for a body that does not decompress.
    """
    encoding = body_encoding(request)
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, TOO_LARGE, f"request body of {length} bytes is over the {limit} byte limit")
    reserved = 0
    if length is not None:
        if not budget.reserve(length):
            raise unavailable("too many request bodies are being received at once; retry")
        reserved = length
    # A body already received whole (the common case of a small write) cannot stall: no timer.
    deadline: contextlib.AbstractAsyncContextManager[object] = (
        contextlib.nullcontext() if request.content.is_eof() else asyncio.timeout(timeout_seconds)
    )
    try:
        async with deadline:
            content = request.content
            chunks: list[bytes] = []
            if length is not None:
                missing = length
                while missing > 0:
                    chunk = await content.read(missing)
                    if not chunk:
                        raise ApiError(400, INVALID_JSON, "request body is shorter than its Content-Length")
                    missing -= len(chunk)
                    chunks.append(chunk)
            else:
                while chunk := await content.readany():
                    if reserved + len(chunk) > limit:
                        raise ApiError(413, TOO_LARGE, f"request body is over the {limit} byte limit")
                    if not budget.reserve(len(chunk)):
                        raise unavailable("too many request bodies are being received at once; retry")
                    reserved += len(chunk)
                    chunks.append(chunk)
        raw = await join(chunks)
        if encoding in IDENTITY_ENCODINGS:
            return raw, reserved
        body, held = await inflate(raw, encoding, limit, budget)
        # The compressed bytes are no longer held: the body's share is its decompressed size.
        budget.release(reserved)
        return body, held
    except TimeoutError:
        budget.release(reserved)
        raise ApiError(
            408,
            REQUEST_TIMEOUT,
            f"request body not received within {timeout_seconds:g}s",
            headers={"Connection": "close"},
        ) from None
    except (HttpProcessingError, RequestPayloadError) as exc:  # e.g. a broken chunked encoding
        budget.release(reserved)
        raise ApiError(400, INVALID_JSON, f"request body cannot be read: {exc}") from None
    except ConnectionResetError:
        # The client went away mid-body: nobody reads this answer, but it is no server error.
        budget.release(reserved)
        raise ApiError(400, INVALID_JSON, "the connection was closed before the body was complete") from None
    except BaseException:
        budget.release(reserved)
        raise


async def join(chunks: list[bytes]) -> bytes:
    """``b"".join(chunks)``, in a thread once it is big: a 10 MiB join took the event loop 15-25 ms
    here (fresh pages to fault in on a busy machine), and ``bytes.join`` releases the GIL to copy
    over 1 MiB, so in a thread it costs the loop nothing."""
    if len(chunks) < 2:
        return chunks[0] if chunks else b""
    if sum(map(len, chunks)) < JOIN_IN_THREAD_BYTES:
        return b"".join(chunks)
    return await asyncio.to_thread(b"".join, chunks)


def _decompressor(encoding: str, raw: bytes) -> zlib._Decompress:
    if encoding in GZIP_ENCODINGS:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # "deflate" is a zlib stream (RFC 1950), but some clients send raw deflate (RFC 1951): as in
    # aiohttp, a first byte whose low nibble is not 8 (the zlib header's method) means raw.
    return zlib.decompressobj(zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS)


async def inflate(raw: bytes, encoding: str, limit: int, budget: BodyBudget | None = None) -> tuple[bytes, int]:
    """``raw`` decompressed, :data:`INFLATE_STEP_BYTES` at a time with a yield to the event loop
    between steps, and the bytes it holds of ``budget`` (the caller releases them; 0 without one).

    413 past ``limit`` decompressed bytes or past :data:`MAX_COMPRESSION_RATIO` x the compressed
    bytes read so far (once over :data:`COMPRESSION_RATIO_FREE_BYTES`), 503 when the budget is
    full, 400 for a stream that is corrupt, truncated or followed by other bytes. Concatenated
    gzip members are one body (as ``cat a.gz b.gz`` makes them).
    """
    decompressor = _decompressor(encoding, raw)
    pending = raw  # compressed bytes of the current stream not yet inflated
    out: list[bytes] = []
    size = 0  # decompressed bytes so far (all held of the budget, if there is one)
    try:
        while True:
            try:
                chunk = decompressor.decompress(pending, INFLATE_STEP_BYTES)
            except zlib.error as exc:
                raise ApiError(400, INVALID_JSON, f"request body cannot be decoded: {exc}") from None
            pending = decompressor.unconsumed_tail
            if size + len(chunk) > limit:
                raise ApiError(413, TOO_LARGE, f"request body is over the {limit} byte limit once decompressed")
            read = len(raw) - len(pending) - len(decompressor.unused_data)  # compressed bytes so far
            if size + len(chunk) > max(COMPRESSION_RATIO_FREE_BYTES, MAX_COMPRESSION_RATIO * read):
                raise ApiError(
                    413,
                    TOO_LARGE,
                    f"request body expands more than {MAX_COMPRESSION_RATIO}x when decompressed; "
                    "send it uncompressed or in smaller batches",
                )
            if budget is not None and not budget.reserve(len(chunk)):
                raise unavailable("too many request bodies are being received at once; retry")
            size += len(chunk)
            out.append(chunk)
            if decompressor.eof:
                rest = decompressor.unused_data
                if not rest:
                    return await join(out), size if budget is not None else 0
                if encoding not in GZIP_ENCODINGS or rest[:2] != b"\x1f\x8b":
                    raise ApiError(400, INVALID_JSON, "request body has bytes after its compressed stream")
                decompressor, pending = _decompressor(encoding, rest), rest
            elif not chunk and not pending:
                raise ApiError(400, INVALID_JSON, "request body cannot be decoded: the compressed stream is truncated")
            await asyncio.sleep(0)
    except BaseException:
        if budget is not None:
            budget.release(size)
        raise
