"""What a task function gets besides its input."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from contracts.deadline import Deadline

# seconds between a task's progress reports, and before its first (worker setting):
# each is an event every gateway reads; at 0.25 s they cost mixed overload 2.7 % of
# its goodput (docs/performance.md)
PROGRESS_INTERVAL = 1.0

ProgressSink = Callable[[float, str | None], None]


@dataclass
class TaskContext:
    task_id: str
    deadline: Deadline
    _sink: ProgressSink
    min_interval: float = PROGRESS_INTERVAL
    # from the start: a report at 0 % would say nothing `running` has not said
    _last: float = field(default_factory=time.monotonic, init=False)

    def remaining(self) -> float:
        """Seconds left until the deadline."""
        return self.deadline.remaining()

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Reports progress (0..1); calls closer than `min_interval` apart are merged."""
        now = time.monotonic()
        fraction = min(1.0, max(0.0, float(fraction)))
        if fraction < 1.0 and now - self._last < self.min_interval:
            return
        self._last = now
        self._sink(fraction, message)
