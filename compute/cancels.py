"""Task ids a worker must remember until their deadlines pass: the ones whose cancel
it heard, and the ones it already finished (a redelivery of those is not run again)."""

from __future__ import annotations

import heapq
import time
from typing import Generic, TypeVar

T = TypeVar("T")

# a message for a remembered id can still arrive until its deadline; the slack covers
# clock skew between the gateway and us
SLACK_MS = 60_000


class Remembered(Generic[T]):
    def __init__(self) -> None:
        self._by_id: dict[str, tuple[int, T]] = {}
        self._expiry: list[tuple[int, str]] = []  # a heap: forgetting costs O(log n)

    def add(self, task_id: str, deadline_ms: int, value: T) -> None:
        self._prune()
        self._by_id[task_id] = (deadline_ms, value)
        heapq.heappush(self._expiry, (deadline_ms, task_id))

    def get(self, task_id: str) -> T | None:
        entry = self._by_id.get(task_id)
        return None if entry is None else entry[1]

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def _prune(self) -> None:
        cutoff = time.time() * 1000 - SLACK_MS
        while self._expiry and self._expiry[0][0] < cutoff:
            deadline, task_id = heapq.heappop(self._expiry)
            entry = self._by_id.get(task_id)
            if entry is not None and entry[0] == deadline:
                del self._by_id[task_id]
