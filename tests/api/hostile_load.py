"""Hostile HTTP load for test_api_hostile, run as its own process (so its CPU and GIL never share
the measuring test's): one client sending maximum-size bodies back to back, and N slow
connections trickling body bytes (reconnecting whenever the server answers or closes).

    python tests/api/hostile_load.py HOST PORT PROJECT KEY SECONDS MAX_BODY_BYTES SLOW_CONNECTIONS DECLARED

``DECLARED`` of the slow connections announce a Content-Length of MAX_BODY_BYTES (they hold a
share of the server's body budget until its read deadline); the others use chunked encoding.
Prints one JSON summary line at the end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
import zlib


def parse_bomb(size: int) -> bytes:
    """The worst JSON per byte for a parser: ``{}`` objects, as many as fit in ``size``."""
    head, tail = b'{"c":[', b"]}"
    count = (size - len(head) - len(tail) + 1) // 3
    return head + b",".join([b"{}"] * count) + tail


def gzip_bomb(size: int) -> bytes:
    """A gzip body far over the decompressed limit (zeros compress ~1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [compressor.compress(b" " * (1 << 20)) for _ in range(min(200, size // 1000 + 20))]
    out.append(compressor.flush())
    return b"".join(out)


async def big_bodies(host: str, port: int, path: str, key: str, until: float, size: int, stats: dict) -> None:
    bodies = [(parse_bomb(size), ""), (gzip_bomb(size), "gzip")]
    i = 0
    while time.monotonic() < until:
        body, encoding = bodies[i % len(bodies)]
        i += 1
        try:
            reader, writer = await asyncio.open_connection(host, port)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Content-Encoding: {encoding}\r\n" if encoding else "")
                + "\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 60)
            status = int(status_line.split()[1]) if status_line else 0
            stats["big"][f"{encoding or 'json'}:{status}"] += 1
            writer.close()
        except (TimeoutError, OSError, ValueError, IndexError) as exc:
            stats["big"][f"error:{type(exc).__name__}"] += 1
            await asyncio.sleep(0.05)


async def slow_connection(host: str, port: int, path: str, key: str, until: float, declared: int | None, stats: dict):
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        stats["open"] += 1
        stats["max_open"] = max(stats["max_open"], stats["open"])
        length = f"Content-Length: {declared}\r\n" if declared else "Transfer-Encoding: chunked\r\n"
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {key}\r\n{length}\r\n"
        try:
            writer.write(head.encode())
            response = asyncio.ensure_future(reader.readline())
            while time.monotonic() < until and not response.done():
                writer.write(b" " if declared else b"1\r\n \r\n")  # one byte at a time
                await writer.drain()
                await asyncio.wait([response], timeout=0.2)
            if response.done():
                line = response.result()
                stats["slow"][int(line.split()[1]) if line else 0] += 1
            else:
                response.cancel()
        except (OSError, ValueError, IndexError):
            stats["slow"]["reset"] += 1
        finally:
            stats["open"] -= 1
            writer.close()


async def main() -> None:
    host, port, project, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    seconds, size, slow, declared = float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
    until = time.monotonic() + seconds
    path = f"/3.0/projects/{project}/events"
    stats: dict = {"big": collections.Counter(), "slow": collections.Counter(), "open": 0, "max_open": 0}
    tasks = [big_bodies(host, port, path, key, until, size, stats)]
    tasks += [slow_connection(host, port, path, key, until, size if i < declared else None, stats) for i in range(slow)]
    await asyncio.gather(*tasks)
    print(
        json.dumps(
            {
                "big": dict(stats["big"]),
                "slow": {str(k): v for k, v in stats["slow"].items()},
                "max_open": stats["max_open"],
            }
        )
    )


if __name__ == "__main__":
    # The hostile clients would run on other machines: at the lowest priority here, so the test
    # measures what their traffic costs the worker, not what their own CPU takes from it.
    os.nice(19)
    asyncio.run(main())
