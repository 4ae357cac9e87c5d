"""Admission control: refuse at once what cannot finish in time, by the rule a worker
starts tasks by (contracts/estimates.py), judged at the end of the wait ahead.

Inputs: the workers serving each task type and the slots they give its queue (their
announcements), the run times of finished tasks and their inputs' cost hints, and
the tasks queued and running in each queue (from the event stream, so every gateway
learns from every task). The broker's own counts are refreshed once a second for
/v1/queues, never asked per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
from aio_pika.abc import AbstractChannel

from contracts.deadline import Deadline
from contracts.errors import DeadlineUnmeetable, NoWorker, Overloaded
from contracts.estimates import LIKELY, RunTimes, RunTimeSummary, start_bar, units
from contracts.events import EventType, TaskEvent
from contracts.messages import ANNOUNCE_EVERY
from contracts.tasks import Task
from gateway.backlog import Backlog, Pace
from gateway.broker import Broker
from gateway.fleet import Fleet
from gateway.settings import GatewaySettings
from gateway.tasktable import Record, TaskTable
from runtime.declare import counts

log = logging.getLogger("timebox.gateway.admission")


@dataclass
class QueueFigures:
    ready: int = 0
    consumers: int = 0
    unacked: int | None = None
    at: float = 0.0


@dataclass(frozen=True)
class Estimate:
    ready: int  # tasks queued ahead, of every type of its queue
    running: int
    parallelism: int  # the slots its queue's workers give it
    wait: float | None
    run: float | None  # the median run time of this input
    likely_run: float | None  # the time left it must start with (start_bar, after its wait)
    priority: int = 0  # the one it is published with
    pace: Pace | None = None  # how fast its queue moves

    @property
    def gap(self) -> float:
        """Seconds between two starts: the margin kept for the wait's error."""
        return self.pace.gap if self.pace else 0.0

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
        self.topology = settings.topology()  # the priority a task is published with
        self.queues = sorted({task.queue for task in self.tasks.values()})
        self.figures = {queue: QueueFigures() for queue in self.queues}
        self.backlogs = {queue: Backlog() for queue in self.queues}
        self._management = management_base(settings)
        self._management_failed_at = 0.0
        table.listeners.append(self.observe)

    # -- learning --------------------------------------------------------------------

    def observe(self, record: Record, event: TaskEvent) -> None:
        task = self.tasks.get(event.task)
        if task is None:
            return
        backlog = self.backlogs[task.queue]
        if event.type is EventType.QUEUED:
            latest, last = self._latest(task, record.cost, event.deadline_ms)
            priority = event.priority or 0
            backlog.add(
                event.task_id,
                task.name,
                units(record.cost),
                priority,
                latest=latest,
                last=last,
                at=event.at,
            )
        elif event.type is EventType.RUNNING:
            backlog.start(event.task_id, event.at)
        elif event.terminal:
            backlog.end(event.task_id, event.at, event.ran)
            if event.type is EventType.SUCCEEDED and event.ran is not None:
                self.runtimes[task.name].add(event.ran, record.cost)

    def _latest(
        self, task: Task[..., Any], cost: float | None, deadline_ms: int | None
    ) -> tuple[float, float]:
        """When a task queued with priorities must start by: the latest admission plans
        (the slowest recent run before its stop, as it was admitted by) and the last a
        worker still starts it (its start bar); Backlog.room protects it between the
        two. Neither without priorities."""
        if not self.topology.priorities or deadline_ms is None:
            return math.inf, math.inf
        runtimes, stop = self.runtimes[task.name], deadline_ms / 1000 - self.settings.stop_margin
        likely = start_bar(runtimes, cost) or 0.0
        slowest = start_bar(runtimes, cost, after_wait=True) or likely
        return stop - slowest, stop - likely

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
        for queue, figures in self.figures.items():
            figures.ready, figures.consumers = await counts(channel, topology.task_queue(queue))
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
        for queue, figures in self.figures.items():
            figures.unacked = by_name.get(self.broker.topology.task_queue(queue))

    def _prune(self, now: float) -> None:
        """Forgets tasks whose end never reached us (their worker or gateway died)."""
        for backlog in self.backlogs.values():
            for task_id in [*backlog.queued, *backlog.running]:
                record = self.table.get(task_id)
                deadline = record.deadline if record else None
                if (
                    record is None
                    or record.refused
                    or record.status.state.terminal
                    or (deadline is not None and deadline.epoch < now - 5)
                ):
                    backlog.end(task_id, now, None)

    # -- estimates -------------------------------------------------------------------

    def priority(self, deadline: Deadline | None) -> int:
        """The priority a task with this deadline is published with now."""
        return 0 if deadline is None else self.topology.priority(deadline.remaining())

    def estimate(
        self, task: Task[..., Any], cost: float | None = None, deadline: Deadline | None = None
    ) -> Estimate:
        """What a task of this type and cost, published now with this deadline, can
        expect: without a deadline, one that waits behind every task queued."""
        runtimes = self.runtimes[task.name]
        backlog = self.backlogs[task.queue]
        slots = self.fleet.slots(task.queue)
        now = time.time()
        priority = self.priority(deadline)
        pace = backlog.pace(slots, now, self._mean_run)
        wait = backlog.wait(slots, now, pace, priority)
        return Estimate(
            backlog.ahead(priority),
            len(backlog.running),
            slots,
            wait,
            runtimes.expect(cost),
            start_bar(runtimes, cost, after_wait=bool(wait)),
            priority,
            pace,
        )

    def expect(self, task: str, cost: float | None) -> float | None:
        """The run time expected of a task of type `task` with this cost (the median)."""
        runtimes = self.runtimes.get(task)
        return runtimes.expect(cost) if runtimes is not None else None

    def _mean_run(self, task: str, units_sum: float, count: int) -> float | None:
        return self.runtimes[task].mean_run(units_sum, count)

    def summary(self, task: str) -> RunTimeSummary:
        return self.runtimes[task].summary()

    def admit(self, task: Task[..., Any], cost: float | None, deadline: Deadline) -> int:
        """Raises NoWorker (503) for a type no worker serves now, DeadlineUnmeetable (422)
        for an input a worker would not start even at once, Overloaded (503) for one it
        would not start at the end of the wait ahead (or that would wait longer than
        `max_queue_wait`); admits whenever there is no data to judge by. Returns the
        priority it judged the task's wait by: the one to publish it with."""
        if not self.fleet.serving(task.name):
            raise NoWorker(
                f"no worker serves task type {task.name!r} at the moment: start one "
                f"(timebox-worker with the module that declares it), or retry shortly",
                retry_after=ANNOUNCE_EVERY,
            )
        if not self.settings.admission:
            return self.priority(deadline)
        runtimes = self.runtimes[task.name]
        left = deadline.remaining() - self.settings.stop_margin
        alone = start_bar(runtimes, cost)
        if alone is not None and alone > left:
            raise DeadlineUnmeetable(
                f"this input needs about {alone:.2f} s to run, but only "
                f"{max(0.0, left):.2f} s are left before its deadline",
                estimate=self.estimate(task, cost, deadline).as_dict(),
                time_left=round(left, 3),
                cost=cost,
                largest_cost_that_fits=runtimes.largest_cost(max(0.0, left), q=LIKELY),
            )
        estimate = self.estimate(task, cost, deadline)
        self._check_wait(task, estimate, left)
        self._check_room(task, cost, estimate, left)
        return estimate.priority

    def _check_wait(self, task: Task[..., Any], estimate: Estimate, left: float) -> None:
        """Raises Overloaded for a task that would wait longer than the settings allow,
        or that a worker would not start at the end of its wait."""
        cap = self.settings.max_queue_wait
        if estimate.wait and cap is not None and estimate.wait > cap:
            raise Overloaded(
                f"{estimate.ready} tasks are queued ahead of it in queue {task.queue!r}: it "
                f"would start in about {estimate.wait:.2f} s, longer than the {cap:g} s a "
                "task may wait here",
                retry_after=max(1, math.ceil(estimate.wait - cap)),
                estimate=estimate.as_dict(),
                time_left=round(left, 3),
            )
        if estimate.wait and estimate.likely_run is not None:
            # one start's time more: what a wait behind others is often off by
            late_by = estimate.wait + estimate.gap + estimate.likely_run - left
            if late_by > 0:
                raise Overloaded(
                    f"{estimate.ready} tasks are queued ahead of it in queue {task.queue!r}: "
                    f"it would start in about {estimate.wait:.2f} s and could end "
                    f"{late_by:.2f} s after its deadline",
                    retry_after=max(1, math.ceil(late_by)),
                    estimate=estimate.as_dict(),
                    time_left=round(left, 3),
                )

    def _check_room(
        self, task: Task[..., Any], cost: float | None, estimate: Estimate, left: float
    ) -> None:
        """Raises Overloaded for a task that would start before tasks queued with later
        deadlines (its priority is higher) and delay one of them past the time a worker
        would still start it, less one start's time kept for the estimate's error: what
        was admitted first keeps its place."""
        if not self.topology.priorities:
            return  # first in, first out: no task ever starts before one queued earlier
        pace, run = estimate.pace, self._mean_run(task.name, units(cost), 1)
        if pace is None or run is None:
            return
        backlog = self.backlogs[task.queue]
        room = backlog.room(estimate.parallelism, time.time(), pace, estimate.priority) - pace.gap
        if pace.delay(run) > room:
            raise Overloaded(
                f"it would start before tasks queued with later deadlines in queue "
                f"{task.queue!r} and make one of them late: they have {max(0.0, room):.2f} s "
                f"to spare, it would take {pace.delay(run):.2f} s",
                retry_after=1,
                time_left=round(left, 3),
            )


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
