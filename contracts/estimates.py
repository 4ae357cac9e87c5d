"""Run-time estimates learned from finished tasks: used by the gateway to refuse work
that cannot finish in time, and by workers to not start it."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# The run-time quantile a task's time left must cover for a worker to start it. The
# gateway's "largest input that fits" uses it too, so the input it advertises is one a
# worker will start, not one it refuses as unmeetable. At 0.9 one start in ten at the
# edge ran past its stop time and was killed, its CPU wasted; behind a backlog a task
# not started costs nothing, as its slot runs the next one, which has more time left.
LIKELY = 0.99


def quantile(values: list[float], q: float) -> float:
    return sorted_quantile(sorted(values), q)


def sorted_quantile(ordered: list[float], q: float) -> float:
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


@dataclass(frozen=True)
class RunTimeSummary:
    samples: int
    mean: float | None
    p90: float | None


class RunTimes:
    """The recent run times of one task type, with the cost (if its spec has a cost
    hint) of each input, so a new input's run time scales with its cost."""

    def __init__(self, window: int = 200, min_samples: int = 5) -> None:
        self.min_samples = min_samples
        self._seconds: deque[float] = deque(maxlen=window)
        self._per_unit: deque[float] = deque(maxlen=window)
        # sorted once per new run time, not per estimate: every request and every
        # delivery asks for one or two quantiles
        self._ordered_rates: list[float] | None = None

    def add(self, seconds: float, cost: float | None = None) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            return
        unit = cost if cost is not None and cost > 0 else 1.0
        rate = seconds / unit
        if not math.isfinite(rate):
            return  # a vanishing cost (say 1e-300 s of burn_cpu) says nothing of the rate
        self._seconds.append(seconds)
        self._per_unit.append(rate)
        self._ordered_rates = None

    def __len__(self) -> int:
        return len(self._seconds)

    @property
    def trusted(self) -> bool:
        return len(self._seconds) >= self.min_samples

    def summary(self) -> RunTimeSummary:
        if not self._seconds:
            return RunTimeSummary(0, None, None)
        values = list(self._seconds)
        return RunTimeSummary(len(values), sum(values) / len(values), quantile(values, 0.9))

    def mean(self) -> float | None:
        # on the admission path of every request: no sort, unlike summary()
        return sum(self._seconds) / len(self._seconds) if self.trusted else None

    def expect(self, cost: float | None = None, q: float = 0.5) -> float | None:
        """Seconds for an input of this cost at the q-quantile of the rates seen: the
        median by default, so that an estimate refuses only what would most likely not
        finish; None until trusted."""
        if not self.trusted:
            return None
        return self._rate(q) * (cost if cost and cost > 0 else 1.0)

    def largest_cost(self, seconds: float, q: float = 0.5) -> float | None:
        """The largest cost whose q-quantile run time fits in `seconds`."""
        if not self.trusted:
            return None
        rate = self._rate(q)
        return seconds / rate if rate > 0 else None

    def _rate(self, q: float) -> float:
        if self._ordered_rates is None:
            self._ordered_rates = sorted(self._per_unit)
        return sorted_quantile(self._ordered_rates, q)
