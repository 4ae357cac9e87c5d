"""Task ids whose cancel this worker heard, kept until their deadlines pass."""

from __future__ import annotations

import time

from contracts.messages import CancelRequest


class CancelRegistry:
    def __init__(self) -> None:
        self._by_id: dict[str, CancelRequest] = {}

    def add(self, request: CancelRequest) -> None:
        self._prune()
        self._by_id[request.task_id] = request

    def get(self, task_id: str) -> CancelRequest | None:
        return self._by_id.get(task_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def _prune(self) -> None:
        # a cancelled message still queued expires at its deadline; a small slack
        # covers clock skew between the gateway and us
        cutoff = time.time() * 1000 - 60_000
        for task_id in [k for k, r in self._by_id.items() if r.deadline_ms < cutoff]:
            del self._by_id[task_id]
