"""Run-time estimates learned from finished tasks: used by the gateway to refuse work
that cannot finish in time, and by workers to not start it."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# The run-time quantile a task's time left must cover for a worker to start it (and
# for a gateway to admit it). At 0.9 one start in ten at the edge ran past its stop
# time and was killed, its CPU wasted.
LIKELY = 0.99


def units(cost: float | None) -> float:
    """The units of work of an input: its cost hint, or one for a type without one."""
    return cost if cost is not None and cost > 0 else 1.0


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
        self._per_unit_sum = 0.0  # kept as they come and go: asked on every request
        # sorted once per new run time, not per estimate: every request and every
        # delivery asks for one or two quantiles
        self._ordered_rates: list[float] | None = None

    def add(self, seconds: float, cost: float | None = None) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            return
        rate = seconds / units(cost)
        if not math.isfinite(rate):
            return  # a vanishing cost (say 1e-300 s of burn_cpu) says nothing of the rate
        if len(self._per_unit) == self._per_unit.maxlen:
            self._per_unit_sum -= self._per_unit[0]
        self._seconds.append(seconds)
        self._per_unit.append(rate)
        self._per_unit_sum += rate
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

    def mean_rate(self) -> float | None:
        """Seconds per unit of cost, on average: what a backlog's work adds up by."""
        return self._per_unit_sum / len(self._per_unit) if self.trusted else None

    def expect(self, cost: float | None = None, q: float = 0.5) -> float | None:
        """Seconds for an input of this cost at the q-quantile of the rates seen: the
        median by default, so that an estimate refuses only what would most likely not
        finish; None until trusted."""
        if not self.trusted:
            return None
        return self._rate(q) * units(cost)

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


def start_bar(runtimes: RunTimes, cost: float | None, *, backlog: bool) -> float | None:
    """The time left a task must have to be started, or admitted: the run time 99 in
    100 of its type stayed under; with others waiting behind it, the slowest recent
    run (a start at the edge that runs past its stop time wastes its CPU, where the
    next one waiting has more time left). None until the run times are trusted."""
    return runtimes.expect(cost, q=1.0 if backlog else LIKELY)
