"""Cluster fan-out, in one place: this worker's peers, the owner of a project, and requests to them.

Each worker meters only the partitions it owns. Peers are found in the consumer group's
assignment metadata (Faust's partition assignor gives every member the URL of every other
member, with its partitions), so nothing extra is published:

* a per-project view is forwarded to the owner of ``partition(project_id)`` of the events topic
  (:meth:`Cluster.owner_of`: the same murmur2 partitioner the producers use, the same owner the
  meter's tables have), like Faust's ``@app.table_route`` but with ``?local=1`` on the forwarded
  request so a stale assignment can never make two workers bounce a request between them;
* cluster-wide views fan out ``?local=1`` to every peer in parallel (:meth:`Cluster.fan_out`,
  short timeout) and merge: each project and each partition has exactly one owner, so the merge
  is a union. A peer that does not answer is named in the per-worker status.

Peers never receive the caller's read token: fan-out and forwarding send the peer token
(:func:`streamapp.web.auth.forward_headers`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import faust
from yarl import URL

from streamapp.partitioning import key_partition
from streamapp.settings import Settings
from streamapp.web.auth import forward_headers

PEER_TIMEOUT_SECONDS = 1.5


def is_local(request: Any) -> bool:
    """``?local=1``: answer from this worker only (what a peer's fan-out or forward asks)."""
    return str(request.query.get("local", "")).lower() in ("1", "true", "yes")


def _ident(url: str) -> tuple[str, int]:
    parsed = URL(url)
    host = parsed.host or ""
    if host in ("localhost", "0.0.0.0", ""):
        host = "127.0.0.1"
    return host, int(parsed.port or 80)


class Cluster:
    """This worker's view of the consumer group's web servers (from the Faust app's assignor)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    @property
    def url(self) -> str:
        return str(self.app.conf.canonical_url).rstrip("/")

    def peers(self) -> list[str]:
        """Web URLs of the other members of the consumer group, from the assignor's metadata."""
        urls: set[str] = set()
        assignor: Any = self.app.assignor
        for getter in ("external_topics_metadata", "tables_metadata"):
            try:
                urls.update(str(u).rstrip("/") for u in getattr(assignor, getter)())
            except Exception:  # noqa: BLE001 - no assignment yet
                continue
        me = _ident(self.url)
        return sorted(u for u in urls if u and _ident(u) != me)

    def owner_of(self, project_id: str) -> str | None:
        """Web URL of the worker owning ``project_id``'s events partition; None when it is this one.

        The partition is the one Kafka's default partitioner (murmur2 of the key, as every producer
        of the events topic uses) gives the project id; its owner comes from the assignment
        metadata every member received. Unknown owner (no assignment yet): answer locally.
        """
        topic = self.settings.events_topic
        partition = key_partition(project_id, self.settings.topic_partitions)
        try:
            distribution = self.app.assignor.external_topics_metadata()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - no assignment yet
            return None
        for url, topics in distribution.items():
            if partition in topics.get(topic, ()):
                dest = str(url).rstrip("/")
                return None if _ident(dest) == _ident(self.url) else dest
        return None

    async def fetch(self, base: str, path: str, params: Mapping[str, str], headers: Mapping[str, str]) -> Any:
        """``GET`` a peer's JSON answer; RuntimeError("HTTP <status>") unless it answers 200."""
        session: Any = self.app.http_client
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_SECONDS)
        async with session.get(base + path, params=dict(params), headers=dict(headers), timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return await resp.json(content_type=None)

    async def post(self, base: str, path: str, params: Mapping[str, str], body: Any, headers: Mapping[str, str]) -> Any:
        """``POST`` JSON to a peer; its JSON answer, RuntimeError("HTTP <status>") unless it answers 200."""
        session: Any = self.app.http_client
        async with session.post(
            base + path,
            params=dict(params),
            json=body,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_SECONDS),
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return await resp.json(content_type=None)

    async def ask_peers(self, ask: Callable[[str], Awaitable[Any]]) -> list[tuple[str, Any]]:
        """``ask(peer)`` for every peer at once: (peer, its answer or the exception it raised)."""
        peers = self.peers()
        answers = await asyncio.gather(*(ask(peer) for peer in peers), return_exceptions=True)
        return list(zip(peers, answers, strict=True))

    async def fan_out(
        self, request: Any, path: str, params: Mapping[str, str], local: Callable[[], Awaitable[Any] | Any]
    ) -> tuple[list[Any], dict[str, str]]:
        """This worker's local answer plus every peer's ``?local=1`` answer; and per-worker status.

        ``request`` is the caller's: nothing of it is forwarded (peers get the peer token).
        """
        headers = forward_headers(self.settings)
        query = {**params, "local": "1"}
        results = await self.ask_peers(lambda peer: self.fetch(peer, path, query, headers))
        mine = local()
        if asyncio.iscoroutine(mine):
            mine = await mine
        answers = [mine]
        status = {self.url: "ok"}
        for peer, result in results:
            if isinstance(result, BaseException):
                status[peer] = f"error: {result!r}"[:200]
            else:
                answers.append(result)
                status[peer] = "ok"
        return answers, status
