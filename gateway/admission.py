"""Admission control: refuse at once what cannot finish in time.

Inputs: the workers serving each task type and their slots (their announcements), the
run times of finished tasks and their inputs' cost hints (from the event stream, so
every gateway learns from every task), and each task queue's depth (from the broker,
refreshed once a second in the background — never a broker round trip per request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
from aio_pika.abc import AbstractChannel

from contracts.deadline import Deadline
from contracts.declare import counts
from contracts.errors import DeadlineUnmeetable, NoWorker, Overloaded
from contracts.estimates import LIKELY, RunTimes, RunTimeSummary
from contracts.events import EventType, TaskEvent, TaskState
from contracts.messages import ANNOUNCE_EVERY
from contracts.tasks import Task
from gateway.broker import Broker
from gateway.fleet import Fleet
from gateway.settings import GatewaySettings
from gateway.tasktable import Record, TaskTable

log = logging.getLogger("timebox.gateway.admission")


class DrainRate:
    """How fast a task type's running tasks end while others of its type wait: the rate
    at which its queue really moves, with the workers' dispatch gaps and any slots
    shared with other types in it. Run times alone miss the gaps: behind a backlog of
    a few seconds, a few milliseconds per task add up to the margin between an answer
    in time and a `504` at the deadline.

    Only the time between two ends counts, and only when work was waiting at the first
    (its slot was refilled at once, so every slot stayed busy until the second): time
    when the queue was empty says nothing of how fast it drains."""

    def __init__(self, window: float = 10.0, min_intervals: int = 10, keep: int = 500) -> None:
        self.window = window
        self.min_intervals = min_intervals
        self.keep = keep
        self._busy_since: float | None = None  # the last end, if work was waiting then
        self._intervals: deque[tuple[float, float]] = deque()  # (end, seconds), oldest first
        self._busy = 0.0  # the sum of their seconds: every request asks, none re-adds

    def add(self, at: float, waiting: bool) -> None:
        """A running task ended at `at`; `waiting`: others of its type were queued."""
        if self._busy_since is not None and at >= self._busy_since:
            self._intervals.append((at, at - self._busy_since))
            self._busy += at - self._busy_since
            if len(self._intervals) > self.keep:
                self._busy -= self._intervals.popleft()[1]
        self._busy_since = at if waiting else None

    def per_second(self, now: float) -> float | None:
        """Tasks ended per second while busy, over the window; None with too few."""
        while self._intervals and self._intervals[0][0] < now - self.window:
            self._busy -= self._intervals.popleft()[1]
        if not self._intervals:
            self._busy = 0.0  # no rounding left over from the sums
        if len(self._intervals) < self.min_intervals or self._busy <= 0:
            return None
        return len(self._intervals) / self._busy


@dataclass
class QueueFigures:
    ready: int = 0
    consumers: int = 0
    unacked: int | None = None
    at: float = 0.0


@dataclass(frozen=True)
class Estimate:
    ready: int
    running: int
    parallelism: float
    wait: float | None
    run: float | None  # the median run time of this input
    likely_run: float | None  # the run time 99 in 100 runs stay under: what workers start by

    def as_dict(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "queued_ahead": self.ready,
            "running": self.running,
            "parallel_slots": self.parallelism,
            "estimated_wait": rounded(self.wait),
            "estimated_run": rounded(self.run),
            "estimated_run_p99": rounded(self.likely_run),
        }


def management_base(settings: GatewaySettings) -> tuple[str, str, httpx.BasicAuth] | None:
    """(base URL, vhost, credentials) of the management API, or None when turned off."""
    if settings.management_url == "off":
        return None
    amqp = urlsplit(settings.amqp_url)
    base = settings.management_url
    if base == "auto":
        base = f"http://{amqp.hostname or 'localhost'}:15672"
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    auth = httpx.BasicAuth(unquote(amqp.username or "guest"), unquote(amqp.password or "guest"))
    return base.rstrip("/"), vhost, auth


class Admission:
    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        table: TaskTable,
        fleet: Fleet,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.table = table
        self.fleet = fleet
        self.tasks = fleet.tasks
        self.runtimes = {
            name: RunTimes(min_samples=settings.estimate_min_samples) for name in self.tasks
        }
        self.figures = {name: QueueFigures() for name in self.tasks}
        self.drain = {name: DrainRate() for name in self.tasks}
        # from the event stream, real time: tasks queued (held by the broker or by a
        # worker waiting for a slot) and running, per task type
        self._queued: dict[str, set[str]] = {name: set() for name in self.tasks}
        self._running: dict[str, set[str]] = {name: set() for name in self.tasks}
        self._management = management_base(settings)
        self._management_failed_at = 0.0
        table.listeners.append(self.observe)

    # -- learning --------------------------------------------------------------------

    def observe(self, record: Record, event: TaskEvent) -> None:
        running, queued = self._running.get(event.task), self._queued.get(event.task)
        if running is None or queued is None:
            return
        if event.type is EventType.QUEUED:
            queued.add(event.task_id)
        elif event.type is EventType.RUNNING:
            queued.discard(event.task_id)
            running.add(event.task_id)
        elif event.terminal:
            queued.discard(event.task_id)
            if event.task_id in running:
                self.drain[event.task].add(event.at, waiting=bool(queued))
            running.discard(event.task_id)
            if event.type is EventType.SUCCEEDED and event.ran is not None:
                self.runtimes[event.task].add(event.ran, record.cost)

    # -- broker figures ----------------------------------------------------------------

    async def run(self) -> None:
        """Refreshes the queue figures once a second while the gateway runs."""
        assert self.broker.connection is not None
        channel: AbstractChannel | None = None
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                try:
                    if channel is None or channel.is_closed:
                        channel = await self.broker.connection.channel()
                    await self._refresh(channel, http)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("queue figures not refreshed: %r", exc)
                    channel = None
                await asyncio.sleep(1.0)

    async def _refresh(self, channel: AbstractChannel, http: httpx.AsyncClient) -> None:
        now = time.time()
        topology = self.broker.topology
        for name in self.tasks:
            figures = self.figures[name]
            figures.ready, figures.consumers = await counts(channel, topology.task_queue(name))
            figures.at = now
        self._prune(now)
        await self._refresh_unacked(http, now)

    async def _refresh_unacked(self, http: httpx.AsyncClient, now: float) -> None:
        if self._management is None or now - self._management_failed_at < 30:
            return
        base, vhost, auth = self._management
        url = f"{base}/api/queues/{quote(vhost, safe='')}"
        params = {"columns": "name,messages_unacknowledged"}
        try:
            response = await http.get(url, params=params, auth=auth)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self._management_failed_at = now
            log.info("management API unavailable (%r): unacked counts not shown", exc)
            return
        by_name = {q["name"]: q.get("messages_unacknowledged") for q in response.json()}
        for name, figures in self.figures.items():
            figures.unacked = by_name.get(self.broker.topology.task_queue(name))

    def _prune(self, now: float) -> None:
        """Forgets tasks whose end never reached us (their worker or gateway died)."""
        for state, by_task in (
            (TaskState.QUEUED, self._queued),
            (TaskState.RUNNING, self._running),
        ):
            for ids in by_task.values():
                for task_id in list(ids):
                    record = self.table.get(task_id)
                    stale = record is None or record.refused or record.status.state is not state
                    deadline = record.deadline if record else None
                    if stale or (deadline is not None and deadline.epoch < now - 5):
                        ids.discard(task_id)

    # -- estimates -------------------------------------------------------------------

    def estimate(self, task: str, cost: float | None = None) -> Estimate:
        runtimes = self.runtimes[task]
        ready = len(self._queued[task])
        running = len(self._running[task])
        parallel = float(self.fleet.slots(task))
        mean = runtimes.mean()
        # measured while a backlog drained; else from run times: parallel / mean
        rate = self.drain[task].per_second(time.time())
        if rate is None and mean is not None and parallel > 0:
            rate = parallel / mean if mean > 0 else math.inf
        wait: float | None = None
        if rate and parallel > 0:
            ahead = ready + running - parallel
            # the running tasks are half done on average
            wait = 0.0 if ahead < 0 else (ahead + 0.5 * parallel) / rate
        return Estimate(
            ready, running, parallel, wait, runtimes.expect(cost), runtimes.expect(cost, LIKELY)
        )

    def summary(self, task: str) -> RunTimeSummary:
        return self.runtimes[task].summary()

    def admit(self, task: Task[..., Any], cost: float | None, deadline: Deadline) -> None:
        """Raises NoWorker (503) for a type no worker serves now, DeadlineUnmeetable (422)
        or Overloaded (503) for work that cannot finish before `deadline`; admits
        whenever there is no data to judge by."""
        if not self.fleet.serving(task.name):
            raise NoWorker(
                f"no worker serves task type {task.name!r} at the moment: start one "
                f"(timebox-worker with the module that declares it), or retry shortly",
                retry_after=ANNOUNCE_EVERY,
            )
        if not self.settings.admission:
            return
        estimate = self.estimate(task.name, cost)
        if estimate.run is None:
            return
        margin = self.settings.reply_margin + self.settings.clock_skew
        time_left = deadline.remaining() - margin
        if estimate.run > time_left:
            largest = self.runtimes[task.name].largest_cost(max(0.0, time_left), q=LIKELY)
            raise DeadlineUnmeetable(
                f"this input needs about {estimate.run:.2f} s to run, but only "
                f"{max(0.0, time_left):.2f} s are left before its deadline",
                estimate=estimate.as_dict(),
                time_left=round(time_left, 3),
                cost=cost,
                largest_cost_that_fits=largest,
            )
        # Behind a backlog, a task whose likely run would not fit after its wait is one a
        # worker would refuse at the end of that wait (its start rule): refused now, the
        # client hears it in a millisecond rather than as a 504 near its deadline.
        run = estimate.likely_run or estimate.run
        if estimate.wait and estimate.wait + run > time_left:
            late_by = estimate.wait + run - time_left
            raise Overloaded(
                f"{estimate.ready} {task.name} tasks are queued ahead: it would start in "
                f"about {estimate.wait:.2f} s and could end {late_by:.2f} s after its deadline",
                retry_after=max(1, math.ceil(late_by)),
                estimate=estimate.as_dict(),
                time_left=round(time_left, 3),
            )


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
