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
    p50: float | None
    p90: float | None


class RunTimes:
    """The recent run times of one task type, with the units of cost of each input.

    A run is modelled as a fixed part plus a part per unit (least squares over the
    window, neither part negative), so that the overhead every task pays (a child hop,
    a busy machine) does not scale with the input: a large input is not charged its
    rate as measured on small ones. Quantiles come from each run's ratio to that line.
    Without inputs of different costs to tell a fixed part by, it is none, and the
    quantiles are those of the runs' seconds per unit."""

    def __init__(self, window: int = 200, min_samples: int = 5) -> None:
        self.min_samples = min_samples
        self._runs: deque[tuple[float, float]] = deque(maxlen=window)  # (units, seconds)
        # sums over the window, kept as runs come and go: Σu, Σs, Σu², Σus, Σ(s/u)
        self._sums = [0.0, 0.0, 0.0, 0.0, 0.0]
        # fitted and sorted once per new run time, not per estimate: every request and
        # every delivery asks for one or two quantiles
        self._fit: tuple[float, float] | None = None
        self._ordered_ratios: list[float] | None = None

    def add(self, seconds: float, cost: float | None = None) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            return
        u = units(cost)
        if not math.isfinite(seconds / u):
            return  # a vanishing cost (say 1e-300 s of burn_cpu) says nothing of the rate
        if len(self._runs) == self._runs.maxlen:
            self._count(*self._runs[0], sign=-1.0)
        self._runs.append((u, seconds))
        self._count(u, seconds, sign=1.0)
        self._fit = self._ordered_ratios = None

    def _count(self, u: float, seconds: float, sign: float) -> None:
        for i, value in enumerate((u, seconds, u * u, u * seconds, seconds / u)):
            self._sums[i] += sign * value

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def trusted(self) -> bool:
        return len(self._runs) >= self.min_samples

    def summary(self) -> RunTimeSummary:
        if not self._runs:
            return RunTimeSummary(0, None, None, None)
        values = sorted(seconds for _, seconds in self._runs)
        return RunTimeSummary(
            len(values),
            sum(values) / len(values),
            sorted_quantile(values, 0.5),
            sorted_quantile(values, 0.9),
        )

    def mean(self) -> float | None:
        # on the admission path of every request: no sort, unlike summary()
        return self._sums[1] / len(self._runs) if self.trusted else None

    def line(self) -> tuple[float, float]:
        """The fixed seconds and the seconds per unit of a run, on average."""
        if self._fit is None:
            self._fit = self._line()
        return self._fit

    def _line(self) -> tuple[float, float]:
        n = len(self._runs)
        if not n:
            return 0.0, 0.0
        sum_u, sum_s, sum_uu, sum_us, sum_rates = self._sums
        mean_u, mean_s = sum_u / n, sum_s / n
        spread = sum_uu / n - mean_u * mean_u
        if spread > 1e-6 * mean_u * mean_u:  # inputs of different costs
            rate = (sum_us / n - mean_u * mean_s) / spread
            fixed = mean_s - rate * mean_u
            if fixed > 0 and rate > 0:
                return fixed, rate
        return 0.0, sum_rates / n  # all of it per unit, as the mean rate

    def mean_run(self, units_sum: float, count: int) -> float | None:
        """The seconds `count` runs of `units_sum` units in all take, on average."""
        if not self.trusted:
            return None
        fixed, rate = self.line()
        return count * fixed + units_sum * rate

    def expect(self, cost: float | None = None, q: float = 0.5) -> float | None:
        """Seconds for an input of this cost at the q-quantile of the runs seen: the
        median by default, so that an estimate refuses only what would most likely not
        finish; None until trusted."""
        if not self.trusted:
            return None
        fixed, per_unit = self._base()
        return (fixed + per_unit * units(cost)) * self._ratio(q)

    def largest_cost(self, seconds: float, q: float = 0.5) -> float | None:
        """The largest cost whose q-quantile run time fits in `seconds`."""
        if not self.trusted:
            return None
        fixed, per_unit = self._base()
        ratio = self._ratio(q)
        if per_unit <= 0 or ratio <= 0:
            return None
        return max(0.0, (seconds / ratio - fixed) / per_unit)

    def _base(self) -> tuple[float, float]:
        """The line the quantiles are ratios to: the fitted one if it has a fixed part;
        else one second per unit, so that the ratios are the runs' own rates."""
        fixed, rate = self.line()
        return (fixed, rate) if fixed > 0 else (0.0, 1.0)

    def _ratio(self, q: float) -> float:
        if self._ordered_ratios is None:
            fixed, per_unit = self._base()
            self._ordered_ratios = sorted(s / (fixed + per_unit * u) for u, s in self._runs)
        return sorted_quantile(self._ordered_ratios, q)


def start_bar(runtimes: RunTimes, cost: float | None, *, after_wait: bool = False) -> float | None:
    """The time left a task must have to be started, or admitted at once: the run time
    99 in 100 of its type stayed under. Admitted to start after a wait, which is only
    estimated, it must clear the slowest recent run: what it may start later than
    estimated by, so that a worker still starts it. None until the run times are
    trusted."""
    return runtimes.expect(cost, q=1.0 if after_wait else LIKELY)
