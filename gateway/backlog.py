"""The work in one task queue, as the event stream tells it: what waits, what runs,
and how fast it really drains."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


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
    when asked: it learns as tasks end)."""

    def __init__(self) -> None:
        self.queued: dict[str, tuple[str, float]] = {}  # task id: (type, units of cost)
        self.running: dict[str, tuple[str, float]] = {}
        self._units: dict[str, float] = {}  # type: its units queued and running
        self._counts: dict[str, int] = {}  # type: its tasks queued and running
        self.drain = DrainRate()

    def add(self, task_id: str, task: str, units: float) -> None:
        if task_id not in self.queued and task_id not in self.running:
            self.queued[task_id] = (task, units)
            self._units[task] = self._units.get(task, 0.0) + units
            self._counts[task] = self._counts.get(task, 0) + 1

    def start(self, task_id: str) -> None:
        if task_id in self.queued:
            self.running[task_id] = self.queued.pop(task_id)

    def end(self, task_id: str, at: float, ran: float | None) -> None:
        if task_id in self.running:
            task, units = self.running.pop(task_id)
            if ran is not None:
                self.drain.add(at, ran, waiting=bool(self.queued))
        elif task_id in self.queued:  # ended before it started
            task, units = self.queued.pop(task_id)
        else:
            return
        self._units[task] -= units
        self._counts[task] -= 1
        if not self.queued and not self.running:
            self._units.clear()  # no rounding left over from the sums
            self._counts.clear()

    def wait(
        self, slots: int, now: float, run: Callable[[str, float, int], float | None]
    ) -> float | None:
        """How long a task queued now waits for a slot, FIFO; `run(type, units, count)`:
        the seconds that many runs of a type take on average (None while unknown). None
        without slots."""
        tasks = len(self.queued) + len(self.running)
        if slots <= 0:
            return None
        ahead = tasks - slots  # tasks to end before a slot is free for it
        if ahead < 0:
            return 0.0
        work = sum(
            run(task, units, self._counts[task]) or 0.0 for task, units in self._units.items()
        )
        drained = self.drain.per_second(now) or float(slots)
        # the running ones are half done on average
        return (ahead + 0.5 * slots) * (work / tasks) / drained
