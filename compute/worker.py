"""The worker: one story per message — decode → deadline and cancel checks → wait
for a slot → run in a child → classify → publish the event → ack.

Only this module touches the broker; the runner and the pool never do."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from compute import metrics, runner
from compute.cancels import Remembered
from compute.forkserver import CannotLoad
from compute.outcome import Disposition, Kind, Outcome, settle
from compute.pool import Child, Pool
from compute.presence import Presences
from compute.settings import WorkerSettings
from contracts.deadline import DEADLINE_HEADER, Deadline
from contracts.errors import InvalidTimeout
from contracts.estimates import RunTimes, start_bar
from contracts.events import CLIENT_GONE, EventType, TaskEvent
from contracts.messages import (
    ANNOUNCE_EVERY,
    CLIENT_GRACE_HEADER,
    CLIENT_UNTIL_HEADER,
    CONTENT_TYPE,
    COST_HEADER,
    DELIVERY_COUNT_HEADER,
    OWNER_HEADER,
    PRESENCE_TYPE,
    PUBLISHED_HEADER,
    WORKER_TYPE,
    CancelRequest,
    Presence,
    WorkerAnnouncement,
)
from runtime import tracing
from runtime.amqp import TRANSIENT, connect, parked_copy, publish, publish_event, until_confirmed
from runtime.background import Background
from runtime.declare import counts, declare

log = logging.getLogger("timebox.worker")
# seconds, after the kill grace, for a worker that lost a message to stop its run
HANDED_BACK_WITHIN = 0.2
RUNNING_AFTER = 0.05  # seconds: a run that ends sooner has no `running` event of its own


class CannotStart(Exception):
    """Connected, but the worker could not set itself up (its topology refused, say)."""


class InvalidMessage(Exception):
    """The message cannot be run at all; it is parked with this reason."""


@dataclass(frozen=True)
class Delivery:
    task: str
    task_id: str
    deadline: Deadline
    input_json: str
    attempt: int
    owner: str | None
    cost: float | None
    published_at: float | None
    client: tuple[float, float] | None  # tied to its client: (presence until, grace)


def decode(message: AbstractIncomingMessage, served: Collection[str]) -> Delivery:
    task, task_id = message.type, message.message_id
    if not task_id or not task:
        raise InvalidMessage("no message_id (task id) or type (task type)")
    if task not in served:
        raise InvalidMessage(f"task type {task!r} is not served by the workers of this queue")
    headers = message.headers or {}
    try:
        deadline = Deadline.from_header(headers.get(DEADLINE_HEADER))
        body = message.body.decode("utf-8")
    except InvalidTimeout as exc:
        raise InvalidMessage(f"{DEADLINE_HEADER}: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidMessage("body is not UTF-8 JSON") from None
    owner = headers.get(OWNER_HEADER)
    return Delivery(
        task=task,
        task_id=task_id,
        deadline=deadline,
        input_json=body,
        # a quorum queue counts the deliveries; a classic one says only "again"
        attempt=int(_number(headers, DELIVERY_COUNT_HEADER) or message.redelivered or 0) + 1,
        owner=owner if isinstance(owner, str) else None,
        cost=_number(headers, COST_HEADER),
        published_at=_published_at(headers, message),
        client=_client(headers),
    )


def _published_at(headers: Mapping[str, object], message: AbstractIncomingMessage) -> float | None:
    """When it was published (epoch seconds): to the microsecond if its publisher said."""
    published_us = _number(headers, PUBLISHED_HEADER)
    if published_us is not None:
        return published_us / 1_000_000
    return message.timestamp.timestamp() if message.timestamp else None


def _client(headers: Mapping[str, object]) -> tuple[float, float] | None:
    """A tied task's presence at publish (epoch seconds) and grace; None if untied."""
    until, grace = _number(headers, CLIENT_UNTIL_HEADER), _number(headers, CLIENT_GRACE_HEADER)
    return (until / 1000, grace) if until and grace else None


def _number(headers: Mapping[str, object], name: str) -> float | None:
    value = headers.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def share(slots: int, queues: list[str], only: list[str] | None) -> dict[str, int]:
    """The slots shared out among the queues (those of `only`, if given): a queue can
    hold no more messages than its own, and needs one."""
    unknown = sorted(set(only or ()) - set(queues))
    if unknown:
        raise CannotStart(f"unknown queues {unknown}; the modules route to {queues}")
    queues = only or queues
    if len(queues) > slots:
        raise CannotStart(
            f"{len(queues)} queues ({', '.join(queues)}) and {slots} slots: each queue "
            "needs a slot; name the ones to serve with --queues, or raise --concurrency"
        )
    each, more = divmod(slots, len(queues))
    return {queue: each + (i < more) for i, queue in enumerate(queues)}


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        modules: list[str],
        *,
        app_dir: str = ".",
        burst: bool = False,
        queues: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.topology = settings.topology()
        self.burst = burst
        self.only = queues  # the queues to consume, of those the modules route to
        self.tasks: list[str] = []
        self.routes: dict[str, str] = {}  # task type: queue
        self.digests: dict[str, str] = {}
        self.retries: dict[str, tuple[int, float]] = {}  # per task type: retries, backoff
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # a worker silent for a heartbeat is taken for frozen: RabbitMQ hands its
        # messages to another after about two, and its tasks must be gone by then
        self.pool = Pool(
            settings.concurrency,
            modules,
            nice=settings.child_nice,
            app_dir=app_dir,
            silence=settings.heartbeat,
        )
        self.cancels: Remembered[CancelRequest] = Remembered()
        self.finished: Remembered[bool] = Remembered()
        self._handlers = Background()
        self._announcing = Background()
        # the round trip that says the worker can hear (compute/presence.py): a publish
        # on the connection that hears the gateways, confirmed, as any of theirs must be
        self.presences = Presences(self._announce, settings.clock_skew)
        self.runtimes: dict[str, RunTimes] = {}
        self.jobs: dict[str, runner.Job] = {}
        self.in_flight = 0
        self.stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._connection: AbstractRobustConnection | None = None
        self._events: AbstractChannel | None = None
        self.queues: dict[str, int] = {}  # the queues it consumes, with the slots of each
        self._consumers: list[tuple[AbstractQueue, str]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._load()
            self._connection = await self._connected()
            if self._connection is None:
                log.info("worker %s stopped before RabbitMQ answered", self.name)
                return
            await self._serve()
        finally:
            await self.pool.close(self.settings.kill_grace)
            if self._connection is not None:
                await self._connection.close()
            log.info("worker %s stopped", self.name)

    async def _load(self) -> None:
        """Loads the task modules in the fork server, which says what they declare, and
        shares the slots among the queues to consume."""
        try:
            await self.pool.start()
        except CannotLoad as exc:
            raise CannotStart(f"the task modules did not load:\n{exc}") from None
        declared = self.pool.tasks
        routes = {name: task["queue"] for name, task in declared.items()}
        self.queues = share(self.pool.size, sorted(set(routes.values())), self.only)
        self.routes = {name: queue for name, queue in routes.items() if queue in self.queues}
        self.tasks = list(self.routes)
        self._check_timeouts(declared)
        self.digests = {task: declared[task]["digest"] for task in self.tasks}
        self.retries = {
            task: (declared[task]["retries"], declared[task]["backoff"]) for task in self.tasks
        }
        min_samples = self.settings.estimate_min_samples
        self.runtimes = {task: RunTimes(min_samples=min_samples) for task in self.tasks}
        metrics.SLOTS.set(self.pool.size)

    def _check_timeouts(self, declared: dict[str, dict[str, Any]]) -> None:
        """Refuses a task whose longest timeout reaches the broker's consumer timeout."""
        limit = self.settings.broker_consumer_timeout
        longest = max(
            declared[task]["max_timeout"] or self.settings.max_timeout for task in self.tasks
        )
        if longest >= limit:
            raise CannotStart(
                f"a task allows a timeout of {longest:g} s, not below the broker's consumer "
                f"timeout ({limit:g} s): RabbitMQ would close the channel of a worker running "
                "it that long, and the task would run twice"
            )

    async def _serve(self) -> None:
        assert self._connection is not None
        try:
            self._events = await self._connection.channel(publisher_confirms=True)
            await declare(self._events, self.topology, self.routes)
            await self._consume_control()
            await self._consume_tasks()
        except Exception as exc:  # the broker away is waited for: this is something else
            log.exception("cannot start")
            raise CannotStart(repr(exc)) from exc
        await self._announce()  # before "ready": a gateway may send it work at once
        self._announcing.spawn(self._keep_announcing())
        log.info(
            "worker %s ready: %d slots, consuming %s",
            self.name,
            self.settings.concurrency,
            ", ".join(f"{self.topology.task_queue(q)} ({n})" for q, n in self.queues.items()),
        )
        if self.burst:
            await self._drain()
        else:
            await self.stopping.wait()
        await self._stop_consuming()
        await self._announcing.cancel()
        with contextlib.suppress(Exception):
            await self._announce(stopping=True)  # gateways stop sending work at once
        await self._idle.wait()

    def stop(self, signum: int | None = None) -> None:
        """The first time: take no new task, finish those running, then stop. The
        second time (an operator's second Ctrl-C): stop at once, as a killed worker
        does but saying so: the connection's end hands the running tasks' messages
        back to their queues (another worker runs them if their deadlines allow), and
        the fork server, told of our end, kills the tasks and what they started."""
        if not self.stopping.is_set():
            self.stopping.set()
            if self.jobs:
                latest = max(job.deadline.epoch_ms for job in self.jobs.values()) / 1000
                log.info(
                    "worker %s stopping: finishing %d running task(s), by %s at the latest "
                    "(their deadline); a second signal stops them now and hands them back",
                    self.name,
                    len(self.jobs),
                    time.strftime("%H:%M:%S", time.localtime(latest)),
                )
            return
        log.warning(
            "worker %s stopping now: %d running task(s) handed back to their queues",
            self.name,
            len(self.jobs),
        )
        os._exit(128 + signum if signum else 1)

    async def _connected(self) -> AbstractRobustConnection | None:
        """The broker connection, waited for until it answers; None if told to stop
        meanwhile."""
        connecting = asyncio.ensure_future(
            connect(
                self.settings.amqp_url,
                f"worker {self.name}",
                heartbeat=self.settings.heartbeat,
                reconnect_interval=self.settings.reconnect_interval,
                log=log,
            )
        )
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
        for waiting in (connecting, stopping):
            waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await connecting
        return None

    async def _consume_control(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel()
        exchange = await channel.get_exchange(self.topology.control_exchange)
        # a name of our own, so that a reconnect re-declares the same queue
        queue = await channel.declare_queue(
            f"{self.topology.control_exchange}.{self.name}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)
        await queue.consume(self._on_control, no_ack=True)

        self._connection.reconnect_callbacks.add(lambda *_: self.presences.resumed())

    async def _consume_tasks(self) -> None:
        """A consumer on each of its queues, whose prefetch is the slots given to that
        queue: the broker never hands over more messages than there are slots, so the
        work waits in RabbitMQ (where its TTL applies and any worker can take it)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        for name, slots in self.queues.items():
            # per consumer: quorum queues refuse a channel-wide (global) prefetch
            await channel.set_qos(prefetch_count=slots + self.settings.lookahead)
            queue = await channel.declare_queue(
                self.topology.task_queue(name),
                durable=True,
                arguments=self.topology.task_queue_arguments(),
            )
            self._consumers.append((queue, await queue.consume(self._on_task)))

    async def _stop_consuming(self) -> None:
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()

    async def _drain(self) -> None:
        """Burst mode: returns once every queue is empty and nothing is in flight."""
        assert self._events is not None
        idle_checks = 0
        while idle_checks < 3:
            await asyncio.sleep(0.1)
            if self.in_flight:
                idle_checks = 0
                continue
            waiting = 0
            for queue in self.queues:
                waiting += (await counts(self._events, self.topology.task_queue(queue)))[0]
            idle_checks = idle_checks + 1 if waiting == 0 else 0

    # -- control ---------------------------------------------------------------------

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        if message.type == PRESENCE_TYPE:
            with contextlib.suppress(ValueError):
                self.presences.heard(Presence.model_validate_json(message.body))
            return
        try:
            request = CancelRequest.model_validate_json(message.body)
        except ValueError:
            log.warning("ignoring an unreadable control message: %r", message.body[:200])
            return
        self.cancels.add(request.task_id, request.deadline_ms, request)
        job = self.jobs.get(request.task_id)
        if job is not None:
            job.cancel()

    # -- tasks -----------------------------------------------------------------------

    async def _on_task(self, message: AbstractIncomingMessage) -> None:
        # The handling runs in a task of our own: aio-pika cancels its callback tasks
        # when the channel closes, but the task in the child keeps its worth — its
        # outcome is still published, and the broker's redelivery is recognised.
        self.in_flight += 1
        self._idle.clear()
        self._handlers.spawn(self._handle_counted(message))

    async def _handle_counted(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except Exception:
            log.exception("unexpected error handling a %s message; it goes back", message.type)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def _why_not_start(self, delivery: Delivery, job: runner.Job) -> Outcome | None:
        """Why a delivered task must not start now, if it must not: the start rule."""
        if job.handed_back:
            return Outcome(Kind.HANDED_BACK, reason=runner.HANDED_BACK)
        if delivery.task_id in self.cancels:
            return Outcome(Kind.CANCELLED, reason="cancelled before start")
        left = delivery.deadline.remaining() - self.settings.stop_margin
        if left <= 0:
            return Outcome(Kind.EXPIRED, reason="deadline passed before start")
        if job.client is not None and await job.client.gone():
            return Outcome(Kind.CANCELLED, reason=f"{CLIENT_GONE}; not started")
        if not self.settings.start_only_if_finishable:
            return None
        # likely not to finish: run, it would burn CPU until its abort; not started, it
        # costs none (the rule admission judges by too, contracts/estimates.py)
        needs = start_bar(self.runtimes[delivery.task], delivery.cost)
        if needs is not None and left < needs:
            return Outcome(
                Kind.EXPIRED, reason=f"unmeetable: needs about {needs:.2f} s, {left:.2f} s left"
            )
        return None

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            delivery = decode(message, self.tasks)
        except InvalidMessage as exc:
            await self._park(message, str(exc))
            log.warning("parked a %s message: %s", message.type, exc)
            await message.ack()
            return
        if await self._seen_before(delivery):
            with contextlib.suppress(Exception):
                await message.ack()
            return
        traced = tracing.extract(message.headers)  # the publishing gateway's span
        _queue_wait_span(delivery, traced)
        with tracing.task_span(
            "timebox.run",
            delivery.task,
            delivery.task_id,
            delivery.deadline,
            kind=SpanKind.CONSUMER,
            context=traced,
            attempt=delivery.attempt,
            worker=self.name,
        ):
            await self._hold_and_run(message, delivery)

    async def _hold_and_run(self, message: AbstractIncomingMessage, delivery: Delivery) -> None:
        async with self._holding(message, delivery) as job:
            outcome = await self._attempt(delivery, job)
            while outcome is not None and self._retried(delivery, job, outcome):
                delay = self.retries[delivery.task][1] * 2 ** (job.attempt - delivery.attempt)
                no_time = self._no_time_to_retry(delivery, job, delay)
                if no_time is not None:
                    outcome = dataclasses.replace(outcome, reason=no_time)
                    break
                await self._retrying(delivery, job, outcome, delay)
                outcome = await self._attempt(delivery, job)
            if outcome is None:  # this worker is stopping: another one runs it
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            if job.announced is not None:  # `running` and the progress reports first
                await job.announced
            await self._settle(message, delivery, job, outcome)
            if outcome.kind is not Kind.HANDED_BACK:
                self.finished.add(job.task_id, delivery.deadline.epoch_ms, True)

    async def _attempt(self, delivery: Delivery, job: runner.Job) -> Outcome | None:
        """One attempt: started in a free slot, unless the start rule says otherwise;
        None if this worker is stopping and hands the task back."""
        outcome = await self._why_not_start(delivery, job)
        if outcome is not None:
            return outcome
        child = await self._slot_for(job)
        if child is None:
            return await self._why_not_start(delivery, job) or Outcome(
                Kind.EXPIRED, reason="deadline passed while waiting for a free slot"
            )
        try:
            if self.stopping.is_set():
                return None
            return await self._why_not_start(delivery, job) or await self._run(delivery, job, child)
        finally:
            self.pool.release(child)

    def _retried(self, delivery: Delivery, job: runner.Job, outcome: Outcome) -> bool:
        """A failure its task declared to be tried again (or its process died), with
        attempts left."""
        retries, _ = self.retries[delivery.task]
        failed = outcome.retried or (outcome.kind is Kind.CRASHED and retries > 0)
        return failed and job.attempt - delivery.attempt < retries

    def _no_time_to_retry(self, delivery: Delivery, job: runner.Job, delay: float) -> str | None:
        """Why another attempt after `delay` could not finish, if it could not: the
        start rule, judged at the end of the backoff."""
        left = job.stop_at - time.time() - delay
        needs = start_bar(self.runtimes[delivery.task], delivery.cost) or 0.0
        if left > needs:
            return None
        return f"no time left to retry: needs about {needs:.2f} s, {max(0.0, left):.2f} s left"

    async def _retrying(
        self, delivery: Delivery, job: runner.Job, failed: Outcome, delay: float
    ) -> None:
        """Says that an attempt failed and another follows, waits the backoff (a cancel
        ends the wait), and readies the job for the next attempt."""
        if job.announced is not None:  # its `running` and progress first
            await job.announced
        unsaid = job.started is not None and not job.said_running
        metrics.retried(delivery.task, failed)
        log.info(
            "retrying %s %s in %.2f s: attempt %d failed (%s)",
            delivery.task,
            delivery.task_id,
            delay,
            job.attempt,
            failed.error.message if failed.error else failed.reason,
        )
        await self._emit(
            delivery,
            EventType.RETRYING,
            attempt=job.attempt,
            started=job.started if unsaid else None,
            error=failed.error,
            reason=f"attempt {job.attempt} failed; the next in {delay:.2f} s",
            ran=failed.ran,
            cpu_seconds=round(failed.cpu_seconds, 4),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(job.cancelled), delay)
        job.attempt += 1
        job.started, job.said_running, job.announced = None, False, None

    @contextlib.asynccontextmanager
    async def _holding(
        self, message: AbstractIncomingMessage, delivery: Delivery
    ) -> AsyncIterator[runner.Job]:
        """The job of a message this worker holds: found by its task id (by a cancel, and
        by another delivery of it, which waits), and handed back if the message's channel
        closes — it can no longer be acked, and RabbitMQ gives it to another worker. A
        message handed back elsewhere waits for that worker to stop its run."""
        job = self.jobs[delivery.task_id] = self._job_for(delivery)
        lost = _closing(message)

        def hand_back(closed: asyncio.Future[Any]) -> None:
            if not closed.cancelled():  # cancelled: we let go of it first
                job.hand_back()

        lost.add_done_callback(hand_back)
        try:
            if message.redelivered:
                await asyncio.sleep(self.settings.kill_grace + HANDED_BACK_WITHIN)
            yield job
        finally:
            lost.cancel()
            self.jobs.pop(job.task_id, None)
            job.finished.set()

    def _job_for(self, delivery: Delivery) -> runner.Job:
        client = delivery.client
        return runner.Job(
            task=delivery.task,
            task_id=delivery.task_id,
            input_json=delivery.input_json,
            deadline=delivery.deadline,
            stop_at=delivery.deadline.epoch - self.settings.stop_margin,
            attempt=delivery.attempt,
            progress_interval=self.settings.progress_interval,
            client=None if client is None else self.presences.tie(delivery.task_id, *client),
            kill_grace=self.settings.kill_grace,
        )

    async def _seen_before(self, delivery: Delivery) -> bool:
        """A task this worker holds or has finished, delivered again (after its channel
        closed, say): it waits for the first delivery's end rather than run twice. True
        if that one finished it: this one is acked, not run."""
        while (held := self.jobs.get(delivery.task_id)) is not None:
            await held.finished.wait()
        return delivery.task_id in self.finished

    async def _slot_for(self, job: runner.Job) -> Child | None:
        """A free child, or None if the job was cancelled or hit its stop time first."""
        child = self.pool.try_acquire()
        if child is None:
            acquire = asyncio.ensure_future(self.pool.acquire(job.stop_at))
            waits: set[asyncio.Future[Any]] = {acquire, job.cancelled}
            try:
                await asyncio.wait(
                    waits,
                    timeout=max(0.0, job.stop_at - time.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                if not acquire.done():
                    acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            if acquire.cancelled():
                return None
            child = acquire.result()
        if job.cancelled.done() or time.time() >= job.stop_at:
            self.pool.release(child)
            return None
        return child

    async def _run(self, delivery: Delivery, job: runner.Job, child: Child) -> Outcome:
        if delivery.published_at is not None:
            metrics.QUEUE_WAIT.labels(delivery.task).observe(
                max(0.0, time.time() - delivery.published_at)
            )
        metrics.SLOTS_BUSY.inc()
        try:
            return await self._run_in(delivery, job, child)
        finally:
            metrics.SLOTS_BUSY.dec()

    async def _run_in(self, delivery: Delivery, job: runner.Job, child: Child) -> Outcome:
        # The task starts while `running` is being confirmed, and its progress reports
        # follow it out in order, never holding the runner up (a broker that blocks
        # publishers must not keep it from stopping the task at its deadline). The
        # outcome goes out after them (_handle), as the gateways ignore what follows it.
        reports: asyncio.Queue[tuple[float, str | None] | None] = asyncio.Queue()
        job.started = time.time()
        ended = asyncio.get_running_loop().create_future()

        async def announce() -> None:
            # A run that ends within RUNNING_AFTER has no `running` of its own: its
            # ending says when it started (one event fewer to publish, store and read).
            if (await asyncio.wait({ended}, timeout=RUNNING_AFTER))[0]:
                return
            await self._emit(delivery, EventType.RUNNING, attempt=job.attempt, at=job.started)
            job.said_running = True
            while (report := await reports.get()) is not None:
                await self._emit(
                    delivery, EventType.PROGRESS, progress=report[0], message=report[1]
                )

        job.announced = asyncio.ensure_future(announce())
        try:
            outcome = await runner.run(child, job, lambda *report: reports.put_nowait(report))
        finally:
            ended.set_result(None)
            reports.put_nowait(None)  # the announcer ends once the reports are out
        if outcome.kind is Kind.SUCCEEDED and outcome.ran is not None:
            self.runtimes[delivery.task].add(outcome.ran, delivery.cost)
        return outcome

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery,
        job: runner.Job,
        outcome: Outcome,
    ) -> None:
        event_type, disposition = settle(outcome)
        if disposition is Disposition.PARK:
            await self._park(message, outcome.reason or "invalid")
        tracing.ended(trace.get_current_span(), outcome.kind.value, outcome.reason)  # the run's
        if event_type is not None and not self._already_said(delivery, outcome):
            unsaid = job.started is not None and not job.said_running
            await self._emit_outcome(
                delivery,
                event_type,
                started=job.started if unsaid else None,
                attempt=job.attempt if unsaid else None,
                result=outcome.output,
                error=outcome.error,
                reason=outcome.reason,
                ran=outcome.ran,
                cpu_seconds=round(outcome.cpu_seconds, 4),
                late_by=outcome.late_by,
            )
        self._log_outcome(delivery, outcome)
        expected = self.runtimes[delivery.task].expect(delivery.cost)
        late = outcome.ran is not None and time.time() > delivery.deadline.epoch
        metrics.record(delivery.task, outcome, late, expected)
        with contextlib.suppress(Exception):  # a closed channel: the broker takes it back
            if disposition is Disposition.REQUEUE:
                await message.nack(requeue=True)
            else:
                await message.ack()

    def _already_said(self, delivery: Delivery, outcome: Outcome) -> bool:
        """A cancel before the start that this worker has announced: its event is out."""
        announced = self.cancels.get(delivery.task_id)
        return (
            outcome.kind is Kind.CANCELLED
            and outcome.ran is None
            and announced is not None
            and announced.announced
        )

    def _log_outcome(self, delivery: Delivery, outcome: Outcome) -> None:
        extra = {
            "task": delivery.task,
            "task_id": delivery.task_id,
            "outcome": outcome.kind.value,
            "ran": outcome.ran,
            "cpu_seconds": outcome.cpu_seconds,
            "late_by": outcome.late_by,
        }
        if outcome.kind is Kind.ABORTED:
            log.warning(
                "aborted %s %s at its deadline: killed %+.3f s from the deadline after "
                "running %.3f s, %.3f CPU s spent",
                delivery.task,
                delivery.task_id,
                outcome.late_by or 0.0,
                outcome.ran or 0.0,
                outcome.cpu_seconds,
                extra=extra,
            )
        else:
            log.info(
                "%s %s %s%s (ran %.3f s, %.3f CPU s)",
                outcome.kind.value,
                delivery.task,
                delivery.task_id,
                f": {outcome.reason}" if outcome.reason else "",
                outcome.ran or 0.0,
                outcome.cpu_seconds,
                extra=extra,
            )

    # -- publishing ------------------------------------------------------------------

    async def _announce(self, *, stopping: bool = False) -> None:
        """Tells every gateway, through the event stream, what this worker serves."""
        announcement = WorkerAnnouncement(
            worker=self.name,
            tasks=self.digests,
            queues=self.queues,
            slots=self.pool.size,
            busy=min(len(self.jobs), self.pool.size),
            stopping=stopping,
        )
        assert self._events is not None
        await publish(
            self._events,
            announcement.model_dump_json().encode(),
            aiormq.spec.Basic.Properties(
                content_type=CONTENT_TYPE, message_type=WORKER_TYPE, delivery_mode=TRANSIENT
            ),
            routing_key=self.topology.events_stream,
            confirm_within=5,
        )

    async def _keep_announcing(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY)
            try:
                await self._announce()
            except Exception as exc:  # the next one, in a moment, may get through
                log.debug("announcement not sent: %r", exc)

    async def _emit_outcome(
        self, delivery: Delivery, event_type: EventType, **fields: object
    ) -> None:
        """The task's last event, in a span of its own: the gateways answer from it."""
        attributes: dict[str, str | int | float] = {"timebox.outcome": event_type.value}
        with tracing.span("timebox.outcome_event", kind=SpanKind.PRODUCER, attributes=attributes):
            await self._emit(delivery, event_type, **fields)

    async def _emit(self, delivery: Delivery, event_type: EventType, **fields: object) -> None:
        event = TaskEvent(
            type=event_type,
            task_id=delivery.task_id,
            task=delivery.task,
            worker=self.name,
            owner=delivery.owner,
            **fields,
        )
        assert self._events is not None
        events, stream = self._events, self.topology.events_stream
        # retried across reconnects: an outcome is never dropped
        await until_confirmed(
            lambda: publish_event(events, stream, event, confirm_within=5),
            f"the {event_type.value} event of task {delivery.task_id}",
            log,
        )

    async def _park(self, message: AbstractIncomingMessage, reason: str) -> None:
        parked = parked_copy(message, reason)
        assert self._events is not None
        exchange, queue = self._events.default_exchange, self.topology.parked_queue
        await until_confirmed(
            lambda: exchange.publish(parked, queue, timeout=5),
            f"a parked copy of {message.message_id}",
            log,
        )


def _queue_wait_span(delivery: Delivery, context: Context) -> None:
    """The time the message waited in RabbitMQ, from its publishing to its delivery."""
    if delivery.published_at is None or not tracing.enabled():
        return
    attributes = tracing.task_attributes(delivery.task, delivery.task_id, delivery.deadline)
    attributes["timebox.time_left_s"] = round(delivery.deadline.epoch - delivery.published_at, 4)
    tracing.tracer.start_span(
        "timebox.queue_wait",
        context=context,
        attributes=attributes,
        start_time=int(delivery.published_at * 1e9),
    ).end()


def _closing(message: AbstractIncomingMessage) -> asyncio.Future[Any]:
    """Done when the channel the message came on closes (at once if it has)."""
    try:
        return message.channel.closing
    except ChannelInvalidStateError:
        closed = asyncio.get_running_loop().create_future()
        closed.set_result(None)
        return closed
