"""The worker: one story per message — decode → deadline and cancel checks → wait
for a slot → run in a child → classify → publish the event → ack.

Only this module touches the broker; the runner and the pool never do."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from compute import metrics, runner
from compute.cancels import Remembered
from compute.dispatch import Credit, Puller
from compute.forkserver import CannotLoad
from compute.leasing import Notices, QueueConsumers
from compute.outcome import Disposition, Kind, Outcome, settle
from compute.pool import Child, Pool
from compute.settings import WorkerSettings
from contracts.amqp import TRANSIENT, connect, parked_copy, publish, publish_event, until_confirmed
from contracts.background import Background
from contracts.deadline import DEADLINE_HEADER, Deadline
from contracts.declare import counts, declare
from contracts.errors import InvalidTimeout
from contracts.estimates import LIKELY, RunTimes
from contracts.events import EventType, TaskEvent
from contracts.messages import (
    ANNOUNCE_EVERY,
    CONTENT_TYPE,
    COST_HEADER,
    DELIVERY_COUNT_HEADER,
    OWNER_HEADER,
    WORK_TYPE,
    WORKER_TYPE,
    CancelRequest,
    WorkerAnnouncement,
    WorkNotice,
)

log = logging.getLogger("timebox.worker")


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


def decode(task: str, message: AbstractIncomingMessage) -> Delivery:
    if not message.message_id:
        raise InvalidMessage("no message_id (task id)")
    if message.type and message.type != task:
        raise InvalidMessage(f"message type {message.type!r} does not match queue task {task!r}")
    headers = message.headers or {}
    if DEADLINE_HEADER not in headers:
        raise InvalidMessage(f"no {DEADLINE_HEADER} header")
    try:
        deadline = Deadline.from_header(headers[DEADLINE_HEADER])
    except InvalidTimeout as exc:
        raise InvalidMessage(str(exc)) from None
    try:
        body = message.body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("body is not UTF-8 JSON") from None
    count = headers.get(DELIVERY_COUNT_HEADER, 0)
    owner = headers.get(OWNER_HEADER)
    cost = headers.get(COST_HEADER)
    return Delivery(
        task=task,
        task_id=message.message_id,
        deadline=deadline,
        input_json=body,
        attempt=(int(count) if isinstance(count, int) else 0) + 1,
        owner=owner if isinstance(owner, str) else None,
        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        published_at=message.timestamp.timestamp() if message.timestamp else None,
    )


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        modules: list[str],
        *,
        app_dir: str = ".",
        burst: bool = False,
        tasks: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.topology = settings.topology()
        self.burst = burst
        self.only = tasks  # the task types to serve, of those the modules declare
        self.tasks: list[str] = []
        self.digests: dict[str, str] = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.pool = Pool(settings.concurrency, modules, nice=settings.child_nice, app_dir=app_dir)
        self.cancels: Remembered[CancelRequest] = Remembered()
        self.finished: Remembered[bool] = Remembered()
        self._handlers = Background()
        self._announcing = Background()
        self.runtimes: dict[str, RunTimes] = {}
        self.jobs: dict[str, runner.Job] = {}
        self.in_flight = 0
        self.stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._connection: AbstractRobustConnection | None = None
        self._events: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self.puller: Puller | None = None
        self._notices: Notices | None = None
        self._pulling: asyncio.Task[None] | None = None
        self.waiting: Callable[[str], Awaitable[int]] | None = None  # ready in a task's queue

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
        """Loads the task modules in the fork server, which says what they declare."""
        try:
            await self.pool.start()
        except CannotLoad as exc:
            raise CannotStart(f"the task modules did not load:\n{exc}") from None
        declared = self.pool.tasks
        unknown = sorted(set(self.only or ()) - set(declared))
        if unknown:
            raise CannotStart(
                f"unknown task types {unknown}; the modules declare {sorted(declared)}"
            )
        self.tasks = self.only or list(declared)
        limit = self.settings.broker_consumer_timeout
        for task in self.tasks:
            maximum = declared[task]["max_timeout"] or self.settings.max_timeout
            if maximum >= limit:
                raise CannotStart(
                    f"task {task!r} allows a timeout of {maximum:g} s, not below the broker's "
                    f"consumer timeout ({limit:g} s): RabbitMQ would close the channel of a "
                    "worker running it that long, and the task would run twice"
                )
        self.digests = {task: declared[task]["digest"] for task in self.tasks}
        min_samples = self.settings.estimate_min_samples
        self.runtimes = {task: RunTimes(min_samples=min_samples) for task in self.tasks}
        metrics.SLOTS.set(self.pool.size)

    async def _serve(self) -> None:
        assert self._connection is not None
        try:
            self._events = await self._connection.channel(publisher_confirms=True)
            await declare(self._events, self.topology, self.tasks)
            await self._consume_control()
            await self._consume_tasks()
        except Exception as exc:  # the broker away is waited for: this is something else
            log.exception("cannot start")
            raise CannotStart(repr(exc)) from exc
        if self.puller is not None:  # "ready" once it has looked at every queue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.puller.looked.wait(), 5)
        await self._announce()  # before "ready": a gateway may send it work at once
        self._announcing.spawn(self._keep_announcing())
        log.info(
            "worker %s ready: %d slots, %s %s",
            self.name,
            self.settings.concurrency,
            "pulling from" if self.puller else "consuming",
            ", ".join(self.topology.task_queue(t) for t in self.tasks),
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
        if self.pulls:  # work notices of the types it pulls; a consumer needs none
            self._notices = Notices(queue, self.topology.work_exchange)
            for task in self.tasks:
                await self._notices.hear(task)
        await queue.consume(self._on_control, no_ack=True)

    @property
    def pulls(self) -> bool:
        """A worker of several task types pulls them (compute/dispatch.py)."""
        return len(self.tasks) > 1

    async def _consume_tasks(self) -> None:
        """One task queue: a consumer whose prefetch is the slot count, so the broker
        never hands over more than the free slots. Several: a puller (compute/dispatch.py)
        takes one message per free slot. Either way the worker consumes the task's
        workers queue, where the gateways count it."""
        assert self._connection is not None
        channel = await self._connection.channel()
        # per-consumer prefetch: quorum queues refuse a channel-wide (global) one
        await channel.set_qos(prefetch_count=self.settings.concurrency)
        queues: dict[str, AbstractQueue] = {}

        async def count(task: str) -> int:
            async with asyncio.timeout(5):  # as a get: a broker that does not answer
                return (await counts(channel, self.topology.task_queue(task)))[0]

        self.waiting = count
        for task in self.tasks:
            queues[task] = await channel.declare_queue(
                self.topology.task_queue(task),
                durable=True,
                arguments=self.topology.task_queue_arguments(),
            )
            presence = await channel.declare_queue(self.topology.workers_queue(task), passive=True)
            self._consumers.append((presence, await presence.consume(_ignore, no_ack=True)))
        if not self.pulls:
            [(task, queue)] = queues.items()
            tag = await queue.consume(functools.partial(self._on_task, task))
            self._consumers.append((queue, tag))
            return

        async def get(task: str) -> AbstractIncomingMessage | None:
            return await queues[task].get(no_ack=False, fail=False, timeout=5)

        leases = None
        if self.settings.lease_slots:
            assert self._notices is not None
            leases = QueueConsumers(
                channel, {t: self.topology.task_queue(t) for t in queues}, self._notices
            )
        self.puller = Puller(
            self.tasks,
            get,
            self.settings.concurrency,
            self.settings.poll_interval,
            count=count,
            consumers=leases,
        )
        self._pulling = asyncio.get_running_loop().create_task(self.puller.run(self._start))

    async def _stop_consuming(self) -> None:
        if self._pulling is not None:
            assert self.puller is not None
            self.puller.close()
            self._pulling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pulling
            self._pulling = None
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
            for task in self.tasks:
                waiting += (await counts(self._events, self.topology.task_queue(task)))[0]
            idle_checks = idle_checks + 1 if waiting == 0 else 0

    # -- control ---------------------------------------------------------------------

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        if message.type == WORK_TYPE:
            with contextlib.suppress(ValueError):
                if self.puller is not None:
                    self.puller.notice(WorkNotice.model_validate_json(message.body).task)
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

    async def _on_task(self, task: str, message: AbstractIncomingMessage) -> None:
        self._start(task, message, None)

    def _start(self, task: str, message: AbstractIncomingMessage, credit: Credit | None) -> None:
        # The handling runs in a task of our own: aio-pika cancels its callback tasks
        # when the channel closes, but the task in the child keeps its worth — its
        # outcome is still published, and the broker's redelivery is recognised.
        self.in_flight += 1
        self._idle.clear()
        self._handlers.spawn(self._handle_counted(task, message, credit))

    async def _handle_counted(
        self, task: str, message: AbstractIncomingMessage, credit: Credit | None
    ) -> None:
        try:
            await self._handle(task, message, credit)
        except Exception:
            log.exception("unexpected error handling a %s message; it goes back to the queue", task)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        finally:
            if credit is not None:
                credit.release()
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    @property
    def _stop_margin(self) -> float:
        """How long before its deadline a task must have stopped: the time for its answer
        to reach the client, and the clocks' disagreement."""
        return self.settings.reply_margin + self.settings.clock_skew

    def _time_left(self, delivery: Delivery) -> float:
        return delivery.deadline.remaining() - self._stop_margin

    def _stop_reason(self, delivery: Delivery) -> Outcome | None:
        """Why a delivered task must not start now, if it must not."""
        cancel = self.cancels.get(delivery.task_id)
        if cancel is not None:
            return Outcome(Kind.CANCELLED, reason="cancelled before start")
        left = self._time_left(delivery)
        if left <= 0:
            return Outcome(Kind.EXPIRED, reason="deadline passed before start")
        # the 99th percentile: a task started with less time left than it likely needs
        # would more often than not burn CPU until its abort; not starting it costs none
        expected = self.runtimes[delivery.task].expect(delivery.cost, q=LIKELY)
        if self.settings.start_only_if_finishable and expected is not None and left < expected:
            return Outcome(
                Kind.EXPIRED,
                reason=f"unmeetable: needs about {expected:.2f} s, {left:.2f} s left",
            )
        return None

    async def _behind_a_backlog(self, delivery: Delivery) -> Outcome | None:
        """A stricter start rule where it costs nothing: a task whose time left covers the
        99th percentile of recent run times but not the slowest is not started while more
        of its type wait in the queue. Its slot runs the next, which has more time left,
        instead of one start in a hundred at the edge running past its stop time and
        being killed, its CPU wasted. Without a backlog it starts: it would finish 99
        times in 100, and nothing else would use the slot."""
        if not self.settings.start_only_if_finishable or self.waiting is None:
            return None
        slowest = self.runtimes[delivery.task].expect(delivery.cost, q=1.0)
        left = self._time_left(delivery)
        if slowest is None or left >= slowest:
            return None
        try:
            waiting = await self.waiting(delivery.task)
        except Exception as exc:  # the broker did not say: the usual rule decides
            log.debug("no count of the %s queue: %r", delivery.task, exc)
            return None
        if not waiting:
            return None
        return Outcome(
            Kind.EXPIRED,
            reason=f"unmeetable behind a backlog: the slowest recent run took {slowest:.2f} s, "
            f"{left:.2f} s left, {waiting} more waiting",
        )

    async def _handle(
        self, task: str, message: AbstractIncomingMessage, credit: Credit | None = None
    ) -> None:
        try:
            delivery = decode(task, message)
        except InvalidMessage as exc:
            await self._park(message, str(exc))
            log.warning("parked a %s message: %s", task, exc)
            await message.ack()
            return
        if await self._seen_before(delivery):
            with contextlib.suppress(Exception):
                await message.ack()
            return
        job = runner.Job(
            task=delivery.task,
            task_id=delivery.task_id,
            input_json=delivery.input_json,
            deadline=delivery.deadline,
            stop_at=delivery.deadline.epoch - self._stop_margin,
            progress_interval=self.settings.progress_interval,
        )
        self.jobs[job.task_id] = job  # from here on a cancel reaches it
        try:
            outcome = self._stop_reason(delivery) or await self._behind_a_backlog(delivery)
            if outcome is None:
                child = await self._slot_for(job)
                if child is None:
                    outcome = self._stop_reason(delivery) or Outcome(
                        Kind.EXPIRED, reason="deadline passed while waiting for a free slot"
                    )
                else:
                    try:
                        if self.stopping.is_set():
                            await message.nack(requeue=True)  # hand it back to another worker
                            return
                        outcome = self._stop_reason(delivery) or await self._run(
                            delivery, job, child
                        )
                    finally:
                        self.pool.release(child)
                        if credit is not None:
                            credit.release()  # the next message may come while this one settles
            await self._settle(message, delivery, outcome)
            if job.announced is not None:
                await job.announced
            self.finished.add(job.task_id, delivery.deadline.epoch_ms, True)
        finally:
            self.jobs.pop(job.task_id, None)
            job.finished.set()

    async def _seen_before(self, delivery: Delivery) -> bool:
        """A redelivery (after a lost connection) of a task this worker is running or
        has finished: it waits for the first run instead of running it twice."""
        running = self.jobs.get(delivery.task_id)
        if running is not None:
            await running.finished.wait()
            return True
        return delivery.task_id in self.finished

    async def _slot_for(self, job: runner.Job) -> Child | None:
        """A free child, or None if the job was cancelled or hit its stop time first."""
        child = self.pool.try_acquire()
        if child is None:
            acquire = asyncio.ensure_future(self.pool.acquire())
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
        # The task starts while `running` is being confirmed. Its frames go out first on
        # the channel, so the stream keeps the order; progress waits for its confirm, the
        # outcome does not (should a reconnect reorder them, a gateway ignores a
        # `running` after the terminal event).
        running = asyncio.ensure_future(
            self._emit(delivery, EventType.RUNNING, attempt=delivery.attempt)
        )
        job.announced = running
        await asyncio.sleep(0)  # let it write its frames before anything else

        async def on_progress(fraction: float, text: str | None) -> None:
            await running
            await self._emit(delivery, EventType.PROGRESS, progress=fraction, message=text)

        outcome = await runner.run(child, job, on_progress, self.settings.kill_grace)
        if outcome.kind is Kind.SUCCEEDED and outcome.ran is not None:
            self.runtimes[delivery.task].add(outcome.ran, delivery.cost)
        return outcome

    async def _settle(
        self, message: AbstractIncomingMessage, delivery: Delivery, outcome: Outcome
    ) -> None:
        event_type, disposition = settle(outcome)
        announced = self.cancels.get(delivery.task_id)
        already_said = (
            outcome.kind is Kind.CANCELLED
            and outcome.ran is None
            and announced is not None
            and announced.announced
        )
        if disposition is Disposition.PARK:
            await self._park(message, outcome.reason or "invalid")
        if not already_said:
            await self._emit(
                delivery,
                event_type,
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
        with contextlib.suppress(Exception):
            await message.ack()

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


async def _ignore(message: AbstractIncomingMessage) -> None:
    """Nothing is ever published to a workers queue."""
