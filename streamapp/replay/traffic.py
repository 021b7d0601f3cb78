"""The replay's load generator: Keen HTTP writes (batch and single) and Kafka writes, open loop.

Runs in its own process (``run_traffic``) so that its CPU use does not share a GIL with the
measurement threads. Every event carries ``"x"`` (a unique id: project index << 32 | sequence) and
``"t"`` (its event time in ms, also its ``keen.timestamp``), so the objects in S3 say by themselves
which event they hold and how long it took. Each request (or Kafka record) is logged with its due
time, latency, outcome and the range of sequence numbers it carried; an event counts as *accepted*
when the API answered 200/201 for it or Kafka acknowledged its record.

Open loop: each tick's requests are due at a fixed time and latency counts from then, so a server
that falls behind cannot hide its queueing in the client (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Outcome codes for writes that got no HTTP status (client timeout, connection error, Kafka error).
NO_ANSWER = 0
KAFKA_ACKED = 200
#: Channels, as stored in the request log.
CHANNELS = ("batch", "single", "kafka")
ID_SHIFT = 32
#: Unacknowledged Kafka records of the calibration's backlog (enough to keep the producer's batches full).
MAX_IN_FLIGHT = 64

_EVENT = b'{"x":%d,"t":%d,"page":"/p/%d","user":%d,"keen":{"timestamp":"%s"}}'
#: A web pageview asking for the add-ons that Keen's auto-collector (keen-tracking.js) asks for: user
#: agent, URL, referrer, IP-to-geo and date-time parsers (``--spike-addons``).
_PAGEVIEW = (
    b'{"x":%d,"t":%d,"page_url":"https://shop.example.com/p/%d?utm_source=news&item=%d#top","user":%d,'
    b'"user_agent":"%s","referrer":"https://www.google.com/search?q=shoes+%d","ip_address":"%s",'
    b'"keen":{"timestamp":"%s","addons":['
    b'{"name":"keen:ua_parser","input":{"ua_string":"user_agent"},"output":"parsed_user_agent"},'
    b'{"name":"keen:url_parser","input":{"url":"page_url"},"output":"parsed_page_url"},'
    b'{"name":"keen:referrer_parser","input":{"referrer_url":"referrer","page_url":"page_url"},'
    b'"output":"referrer_info"},'
    b'{"name":"keen:ip_to_geo","input":{"ip":"ip_address"},"output":"ip_geo_info"},'
    b'{"name":"keen:date_time_parser","input":{"date_time":"keen.timestamp"},"output":"timestamp_info"}]}}'
)
#: Visitors' addresses: 250 public ones, in ranges that GeoIP databases place in five countries.
_ADDRESSES = [
    f"{prefix}.{host}".encode()
    for prefix in ("81.2.69", "89.160.20", "216.160.83", "175.16.199", "2.125.160")
    for host in range(10, 60)
]
_USER_AGENTS = [
    agent.replace("{v}", str(version)).encode()
    for version in range(60)
    for agent in (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/1{v}.0.0.0 "
        "Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_{v} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.0 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.{v} "
        "Safari/605.1.15",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/12{v}.0.0.0 Mobile "
        "Safari/537.36",
    )
]


def event_id(project_index: int, seq: int) -> int:
    return (project_index << ID_SHIFT) | seq


def iso_ms(epoch_ms: int) -> bytes:
    seconds, ms = divmod(epoch_ms, 1000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z").encode()


def encode_events(project_index: int, first_seq: int, count: int, epoch_ms: int, addons: bool = False) -> bytes:
    """``count`` events joined by commas (the inside of a JSON array); ``addons``: pageviews that
    ask for five of Keen's add-ons (a few hundred distinct agents, URLs and addresses, as on a real site)."""
    stamp = iso_ms(epoch_ms)
    base = project_index << ID_SHIFT
    if addons:
        agents = _USER_AGENTS
        return b",".join(
            [
                _PAGEVIEW
                % (
                    base | seq,
                    epoch_ms,
                    seq % 300,
                    seq % 40,
                    seq % 9973,
                    agents[seq % 240],
                    seq % 50,
                    _ADDRESSES[seq % 250],
                    stamp,
                )
                for seq in range(first_seq, first_seq + count)
            ]
        )
    return b",".join(
        [_EVENT % (base | seq, epoch_ms, seq % 50, seq % 9973, stamp) for seq in range(first_seq, first_seq + count)]
    )


@dataclass
class Writer:
    """One project's write path in the generator."""

    name: str
    index: int
    key: str
    channel: str
    addons: bool = False  # its events ask for Keen's add-ons (``encode_events``)
    seq: int = 0
    carry: float = 0.0


class RequestLog:
    """Columns of the request log (plain lists while running, numpy arrays when saved)."""

    columns = ("due", "latency", "project", "channel", "status", "first", "n", "ok")

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, int, int, int, int, int, int]] = []

    def add(self, due: float, latency: float, writer: Writer, status: int, first: int, n: int, ok: int) -> None:
        self.rows.append((due, latency, writer.index, CHANNELS.index(writer.channel), status, first, n, ok))

    def save(self, path: Path, **extra: Any) -> None:
        import numpy as np  # the spawned traffic process needs it only once, to save its log

        arrays = {}
        for i, name in enumerate(self.columns):
            kind = np.float64 if name in ("due", "latency") else np.int64
            arrays[name] = np.array([row[i] for row in self.rows], dtype=kind)
        np.savez(path, **arrays, **{k: np.asarray(v) for k, v in extra.items()})


class Generator:
    """Sends the scenario's traffic; ``config`` is plain data so the process can be spawned."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.web = config["web"].rstrip("/")
        self.topic = config["topic"]
        self.tick = float(config["tick_seconds"])
        self.timeout = float(config["http_timeout_seconds"])
        self.batch_size = int(config["batch_size"])
        self.kafka_batch_size = int(config["kafka_batch_size"])
        self.writers = [Writer(**w) for w in config["writers"]]
        self.log = RequestLog()
        self.pending: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        # aiohttp and aiokafka are imported in the spawned traffic process only (here and in the two
        # http_* methods): the parent, and every `streamapp` command through the CLI, skip them.
        import aiohttp
        from aiokafka import AIOKafkaProducer

        # The spiking customer and the others are different clients: separate connection pools and
        # producers, so the spike's queue in *this* process cannot delay the others' writes.
        self.producers = [
            AIOKafkaProducer(
                bootstrap_servers=self.config["bootstrap"],
                linger_ms=5,
                acks="all",
                max_batch_size=1 << 20,
                max_request_size=4 << 20,
                request_timeout_ms=int(self.timeout * 1000),
                # As most Kafka producers do: the pageviews shrink ~5x, and the broker that every arm
                # shares with the worker on this machine moves that much less.
                compression_type="lz4",
            )
            for _ in range(2)
        ]
        for producer in self.producers:
            await producer.start()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        limits = (int(self.config["spike_connections"]), int(self.config["other_connections"]))
        self.sessions = [
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout) for limit in limits
        ]
        try:
            if self.config["mode"] == "calibrate":
                await self.calibrate()
            else:
                await self.replay()
            if self.pending:
                await asyncio.wait(list(self.pending), timeout=self.timeout + 5)
        finally:
            for session in self.sessions:
                await session.close()
            for producer in self.producers:
                await producer.stop()

    def client(self, writer: Writer) -> int:
        """0 for the spiking customer's own client, 1 for everybody else's."""
        return 0 if writer.name == self.config.get("spiking_project") or writer.index == 0 else 1

    # ---------------------------------------------------------------- schedules
    def rate(self, writer: Writer, elapsed: float) -> float:
        cfg = self.config
        if writer.name == cfg["spiking_project"] and cfg["spike_start"] <= elapsed < cfg["spike_end"]:
            ramp = float(cfg.get("spike_ramp_seconds") or 0.0)
            climbed = min(1.0, (elapsed - cfg["spike_start"]) / ramp) if ramp > 0 else 1.0
            base = float(cfg["base_eps"])
            return base + (float(cfg["spike_eps"]) - base) * climbed
        if writer.channel == "single":
            return min(float(cfg["base_eps"]), float(cfg["single_write_max_eps"]))
        return float(cfg["base_eps"])

    async def replay(self) -> None:
        t0 = float(self.config["t0"])
        duration = float(self.config["duration"])
        kafka_share = float(self.config["spike_kafka_share"])
        tick_no = 0
        while True:
            due = t0 + tick_no * self.tick
            elapsed = due - t0
            if elapsed >= duration:
                return
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            epoch_ms = int(due * 1000)
            for writer in self.writers:
                writer.carry += self.rate(writer, elapsed) * self.tick
                n = int(writer.carry)
                writer.carry -= n
                if n <= 0:
                    continue
                if n > self.batch_size:  # the spike: a share straight to Kafka, the rest in HTTP batches
                    to_kafka = int(n * kafka_share)
                    self.send_chunks(writer, to_kafka, due, epoch_ms, kafka=True)
                    self.send_chunks(writer, n - to_kafka, due, epoch_ms, kafka=False)
                elif writer.channel == "single":
                    for _ in range(n):
                        self.spawn(self.http_single(writer, self.take(writer, 1), due, epoch_ms))
                else:
                    self.send_chunks(writer, n, due, epoch_ms, kafka=writer.channel == "kafka")
            tick_no += 1

    async def calibrate(self) -> None:
        """A backlog for the worker to work through alone: the spike's Kafka records, as many as the
        producer takes in ``duration`` seconds (at most ``MAX_IN_FLIGHT`` unacknowledged), and no
        other writes. The caller times the worker's sink once this returns (``command.calibrate``)."""
        duration = float(self.config["duration"])
        writer = self.writers[0]
        started = time.time()
        while time.time() - started < duration:
            if len(self.pending) >= MAX_IN_FLIGHT:
                await asyncio.wait(list(self.pending), return_when=asyncio.FIRST_COMPLETED)
                continue
            now = time.time()
            self.send_chunks(writer, self.kafka_batch_size, now, int(now * 1000), kafka=True)
            await asyncio.sleep(0)

    # ---------------------------------------------------------------- sends
    def take(self, writer: Writer, n: int) -> int:
        first = writer.seq
        writer.seq += n
        return first

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    def send_chunks(self, writer: Writer, n: int, due: float, epoch_ms: int, *, kafka: bool) -> None:
        chunk = self.kafka_batch_size if kafka else self.batch_size
        while n > 0:
            size = min(n, chunk)
            first = self.take(writer, size)
            if kafka:
                self.spawn(self.kafka_batch(writer, first, size, due, epoch_ms))
            else:
                self.spawn(self.http_batch(writer, first, size, due, epoch_ms))
            n -= size

    async def http_batch(self, writer: Writer, first: int, n: int, due: float, epoch_ms: int) -> int:
        import aiohttp

        body = b'{"pageviews":[' + encode_events(writer.index, first, n, epoch_ms, writer.addons) + b"]}"
        url = f"{self.web}/3.0/projects/{writer.name}/events"
        status, ok = NO_ANSWER, 0
        try:
            async with self.sessions[self.client(writer)].post(
                url, data=body, headers={"Authorization": writer.key, "Content-Type": "application/json"}
            ) as resp:
                answer = await resp.read()
                status = resp.status
                if status == 200:
                    ok = answer.count(b'"success":true')
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        self.log.add(due, time.time() - due, writer, status, first, n, ok)
        return ok

    async def http_single(self, writer: Writer, first: int, due: float, epoch_ms: int) -> None:
        import aiohttp

        body = encode_events(writer.index, first, 1, epoch_ms)
        url = f"{self.web}/3.0/projects/{writer.name}/events/pageviews"
        status = NO_ANSWER
        try:
            async with self.sessions[self.client(writer)].post(
                url, data=body, headers={"Authorization": writer.key, "Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        self.log.add(due, time.time() - due, writer, status, first, 1, 1 if status == 201 else 0)

    async def kafka_batch(self, writer: Writer, first: int, n: int, due: float, epoch_ms: int) -> None:
        events = encode_events(writer.index, first, n, epoch_ms, writer.addons)
        head = b'{"project_id":"%s","collection":"pageviews",' % writer.name.encode()
        if n == 1:
            value = head + b'"event":' + events + b"}"
        else:
            value = head + b'"events":[' + events + b"]}"
        status = NO_ANSWER
        try:
            await (await self.producers[self.client(writer)].send(self.topic, value, key=writer.name.encode()))
            status = KAFKA_ACKED
        except Exception:  # noqa: BLE001 - any producer failure is an unacknowledged write
            pass
        self.log.add(due, time.time() - due, writer, status, first, n, n if status == KAFKA_ACKED else 0)


def run_traffic(config: dict[str, Any]) -> str:
    """Process entry point: run the generator, save its request log to ``config["out"]`` (npz)."""
    try:
        import uvloop  # optional: the plain asyncio loop otherwise

        uvloop.install()
    except ImportError:
        pass
    generator = Generator(config)
    asyncio.run(generator.run())
    out = Path(config["out"])
    generator.log.save(out, names=[w.name for w in generator.writers])
    return str(out)
