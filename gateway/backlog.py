"""The work in one task queue, as the event stream tells it: what waits, what runs,
and how fast it really drains."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

ARRIVALS = 5.0  # seconds of arrivals of higher priority that predict those to come
MOST_TAKEN = 0.8  # of the slots' pace, by what overtakes: a wait grows at most 5-fold


class DrainRate:
    """The seconds of work a queue's slots get through per second while others wait:
    the rate at which it really moves, with the workers' dispatch gaps in it. Run
    times alone miss the gaps: behind a backlog of a few seconds, a few milliseconds
    per task add up to the margin between an answer in time and a `504`.

    Only the time between two ends counts, and only when work was waiting at the first
    (its slot was refilled at once, so every slot stayed busy until the second): time
    when the queue was empty says nothing of how fast it drains."""

    def __init__(self, window: float = 10.0, min_intervals: int = 10, keep: int = 500) -> None:
        self.window = window
        self.min_intervals = min_intervals
        self.keep = keep
        self._busy_since: float | None = None  # the last end, if work was waiting then
        # (end, seconds since the last, work that ended), oldest first
        self._intervals: deque[tuple[float, float, float]] = deque()
        self._busy = self._work = 0.0  # their sums: every request asks, none re-adds

    def add(self, at: float, work: float, waiting: bool) -> None:
        """A task that ran `work` seconds ended at `at`; `waiting`: others were queued."""
        if self._busy_since is not None and at >= self._busy_since:
            self._intervals.append((at, at - self._busy_since, work))
            self._busy += at - self._busy_since
            self._work += work
            if len(self._intervals) > self.keep:
                self._forget()
        self._busy_since = at if waiting else None

    def per_second(self, now: float) -> float | None:
        """Seconds of work done per second while busy, over the window; None with too
        few ends to tell."""
        while self._intervals and self._intervals[0][0] < now - self.window:
            self._forget()
        if not self._intervals:
            self._busy = self._work = 0.0  # no rounding left over from the sums
        if len(self._intervals) < self.min_intervals or self._busy <= 0:
            return None
        return self._work / self._busy

    def _forget(self) -> None:
        _, busy, work = self._intervals.popleft()
        self._busy -= busy
        self._work -= work


class Backlog:
    """One queue's tasks, queued and running: how many of each type, and how many units
    of cost (their work is each type's run time for them, which the caller knows best
    when asked: it learns as tasks end), and in which order the queue hands them out:
    the highest priority first, first in first out within one."""

    def __init__(self) -> None:
        # task id: (type, units of cost, priority, the latest start planned for it, the
        # last a worker would still start it)
        self.queued: dict[str, tuple[str, float, int, float, float]] = {}
        self.running: dict[str, tuple[str, float, float]] = {}  # (type, units, started)
        self._units: dict[str, float] = {}  # type: its units queued and running
        self._counts: dict[str, int] = {}  # type: its tasks queued and running
        self._waiting: dict[int, int] = {}  # priority: tasks queued with it
        # (when, priority) of the tasks queued in the last ARRIVALS seconds with one
        # above the lowest, and how many of each: they overtake what waits below them
        self._arrivals: deque[tuple[float, int]] = deque()
        self._arrived: dict[int, int] = {}
        self.drain = DrainRate()

    def add(
        self,
        task_id: str,
        task: str,
        units: float,
        priority: int = 0,
        latest: float = math.inf,
        last: float = math.inf,
        at: float = 0.0,
    ) -> None:
        if task_id not in self.queued and task_id not in self.running:
            if priority > 0:
                self._forget_arrivals(at)  # bounded even at a gateway no one submits to
                self._arrivals.append((at, priority))
                self._arrived[priority] = self._arrived.get(priority, 0) + 1
            self.queued[task_id] = (task, units, priority, latest, last)
            self._units[task] = self._units.get(task, 0.0) + units
            self._counts[task] = self._counts.get(task, 0) + 1
            self._waiting[priority] = self._waiting.get(priority, 0) + 1

    def start(self, task_id: str, at: float) -> None:
        if task_id in self.queued:
            task, units, priority, *_ = self.queued.pop(task_id)
            self.running[task_id] = (task, units, at)
            self._waiting[priority] -= 1

    def end(self, task_id: str, at: float, ran: float | None) -> None:
        if task_id in self.running:
            task, units, _ = self.running.pop(task_id)
            if ran is not None:
                self.drain.add(at, ran, waiting=bool(self.queued))
        elif task_id in self.queued:  # ended before it started
            task, units, priority, *_ = self.queued.pop(task_id)
            self._waiting[priority] -= 1
        else:
            return
        self._units[task] -= units
        self._counts[task] -= 1
        if not self.queued and not self.running:
            self._units.clear()  # no rounding left over from the sums
            self._counts.clear()

    def ahead(self, priority: int = 0) -> int:
        """The tasks queued that start before one queued now with `priority`."""
        return sum(n for level, n in self._waiting.items() if level >= priority)

    def pace(
        self, slots: int, now: float, run: Callable[[str, float, int], float | None]
    ) -> Pace | None:
        """How fast the queue moves now; `run(type, units, count)`: the seconds that
        many runs of a type take on average (None while unknown). None without slots."""
        if slots <= 0:
            return None
        tasks = len(self.queued) + len(self.running)
        work = sum(
            run(task, units, self._counts[task]) or 0.0 for task, units in self._units.items()
        )
        mean = work / tasks if tasks else 0.0
        drained = self.drain.per_second(now) or float(slots)
        # what is left of the runs under way: each of its own expected run since its
        # start; a queued one a slot is taking now (its `running` on its way) has it all
        left = [
            max(0.0, (run(task, units, 1) or mean) - (now - started))
            for task, units, started in self.running.values()
        ]
        left += [mean] * self._taking(slots)
        return Pace(mean, drained, tuple(sorted(t * slots / drained for t in left)))

    def _taking(self, slots: int) -> int:
        """The queued tasks the slots that look free are taking now: their `running`
        events are on their way."""
        return min(len(self.queued), max(0, slots - len(self.running)))

    def _wait_at(self, position: int, slots: int, pace: Pace) -> float:
        """The wait of the task queued at `position` (0: next) for a slot: the n-th of
        the slots to free if it is among the first, else what is left of the runs under
        way shared over the slots and those queued before it, one per start's time."""
        ahead = len(self.running) + position - slots  # to end before a slot frees
        if ahead < 0:
            return 0.0
        if ahead < len(pace.frees):
            return pace.frees[ahead]
        return ahead * pace.gap + sum(pace.frees) / slots

    def wait(self, slots: int, now: float, pace: Pace | None, priority: int = 0) -> float | None:
        """How long a task queued now with `priority` waits for a slot. A slot that
        looks free while tasks are queued is being given one of them (its `running` is
        on its way), whatever their priority. Tasks queued later with a higher one go
        first: the slots it waits for move only at the pace they leave it, as in the
        last ARRIVALS seconds. None without slots."""
        if pace is None:
            return None
        wait = self._wait_at(max(self.ahead(priority), self._taking(slots)), slots, pace)
        taken = min(MOST_TAKEN, self._overtaking(now, priority) * pace.gap / ARRIVALS)
        return wait / (1.0 - taken)

    def _overtaking(self, now: float, priority: int) -> int:
        """The tasks queued in the last ARRIVALS seconds with a priority above this."""
        self._forget_arrivals(now)
        return sum(n for level, n in self._arrived.items() if level > priority)

    def _forget_arrivals(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - ARRIVALS:
            _, level = self._arrivals.popleft()
            self._arrived[level] -= 1

    def room(self, slots: int, now: float, pace: Pace | None, priority: int) -> float:
        """The seconds a task queued now with `priority` can delay the tasks queued with
        a lower one (it starts before them all) without one of them starting after the
        latest planned for it: the least of their spare times, below zero once one is
        past it (none may go ahead of it while a worker would still start it). One a
        worker would no longer start is no reason to refuse: it will not run either way."""
        if pace is None or all(level >= priority for level in self._waiting):
            return math.inf
        position = {level: self.ahead(level + 1) for level in self._waiting if level < priority}
        least = math.inf
        for _, _, level, latest, last in self.queued.values():  # FIFO within a level
            if level < priority:
                start = now + self._wait_at(position[level], slots, pace)
                if start <= last:
                    least = min(least, latest - start)
                position[level] += 1
        return least


class Pace(NamedTuple):
    mean: float  # the seconds of work of a task queued or running, on average
    drained: float  # the seconds of work the slots get through per second
    frees: tuple[float, ...] = ()  # seconds until each busy slot frees, soonest first

    @property
    def gap(self) -> float:
        """Seconds between two starts, on average."""
        return self.mean / self.drained

    def delay(self, run: float) -> float:
        """How much a task of `run` seconds queued ahead delays the ones behind it."""
        return run / self.drained
