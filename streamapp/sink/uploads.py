"""The order in which the sink starts its uploads: round robin over flows, FIFO within a flow.

A flow is one created project, or ALL unknown projects together (``UNKNOWN_FLOW``), or the
manifest parts. When a window closes with 50,000 one-event objects of invented project ids,
they wait in the one unknown flow, and a created project's object of the same window is started
within one round (at most one object per flow ahead of it), not behind the 50,000.

Order does not touch exactly-once: keys and bytes are decided by the window state machine,
and a partition is committed only when everything before its commit point is durable.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """``push(flow, item)`` / ``pop()``: one item of each waiting flow in turn."""

    def __init__(self) -> None:
        self._flows: OrderedDict[Hashable, deque[T]] = OrderedDict()  # rotation order
        self._len = 0

    def push(self, flow: Hashable, item: T) -> None:
        queue = self._flows.get(flow)
        if queue is None:
            queue = self._flows[flow] = deque()
        queue.append(item)
        self._len += 1

    def pop(self) -> T:
        """The next item: the head of the first flow in turn, which then goes to the back."""
        flow, queue = self._flows.popitem(last=False)  # KeyError when empty, like dict.popitem
        item = queue.popleft()
        if queue:
            self._flows[flow] = queue
        self._len -= 1
        return item

    def flows(self) -> int:
        return len(self._flows)

    def __len__(self) -> int:
        return self._len
