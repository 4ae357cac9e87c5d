"""What the routes share: settings, the broker, the task table, and the cancel rule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio

from contracts.errors import (
    BrokerUnavailable,
    ConfirmLost,
    HistoryNotRead,
    TaskAlreadyEnded,
    TaskNotFound,
    TimeboxError,
)
from contracts.events import EventType, TaskEvent, TaskState
from contracts.messages import CancelRequest
from contracts.tasks import Task
from gateway import metrics
from gateway.accounting import Ledger
from gateway.admission import Admission
from gateway.auth import Auth
from gateway.broker import Broker
from gateway.clients import Clients
from gateway.console import Activity
from gateway.eventlog import EventLog
from gateway.fleet import Fleet
from gateway.parked import Parked
from gateway.settings import GatewaySettings
from gateway.sse import Fanout
from gateway.tasktable import Record, TaskTable
from runtime.amqp import until_confirmed
from runtime.background import Background

log = logging.getLogger("timebox.gateway")


@dataclass
class Services:
    settings: GatewaySettings
    tasks: dict[str, Task[..., Any]]
    fleet: Fleet
    broker: Broker
    table: TaskTable
    eventlog: EventLog
    admission: Admission
    auth: Auth
    clients: Clients
    fanout: Fanout
    parked: Parked
    ledger: Ledger
    activity: Activity
    background: Background = field(default_factory=Background)
    # set when the server is asked to stop: at the signal under `python -m gateway`
    # (gateway/__main__.py), else by sse-starlette once it notices
    shutting_down: anyio.Event = field(default_factory=anyio.Event)
    # resolved at the signal too: one future every waiting RPC watches, not a task each
    stopping: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def begin_shutdown(self) -> None:
        self.shutting_down.set()
        if not self.stopping.done():
            self.stopping.set_result(None)

    async def end_streams_on_shutdown(self) -> None:
        await self.shutting_down.wait()
        closed = self.fanout.close_all()
        log.info("shutting down: ended %d event streams", closed)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.background.spawn(coro)

    async def find(self, task_id: str, owner: str | None, *, stream: bool = False) -> Record:
        record = await self.arrival(task_id, stream=stream)
        if record is not None and record.owner != owner:
            # as slow as an unknown id: existence does not leak
            await asyncio.sleep(self._arrival_wait(task_id))
        if record is None or record.owner != owner:
            raise self.not_found(task_id)
        return record

    async def arrival(self, task_id: str, *, stream: bool = False) -> Record | None:
        """The task's record, waiting briefly for it to show up in the event stream.

        For an event stream, while this gateway has not read the whole event stream
        (it just started, or is not yet connected), it waits up to `history_wait` for
        the task or the end of the history, rather than answering 503: a browser's
        EventSource stops for good on a 503, and a stream is long-lived anyway. The
        wait ends early if the gateway is told to stop."""
        wait = self._arrival_wait(task_id)
        history = self.eventlog.history_read
        if stream and wait and not history.is_set():
            with metrics.STREAMS_WAITING.track_inprogress():
                waits: list[asyncio.Future[Any]] = [
                    asyncio.ensure_future(self.table.arrival(task_id, self.settings.history_wait)),
                    asyncio.ensure_future(history.wait()),
                ]
                try:
                    stopping = self.stopping  # shared: not to be cancelled here
                    await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        return await self.table.arrival(task_id, wait)

    def not_found(self, task_id: str) -> TimeboxError:
        """What an id the table does not know gets: 404, or 503 while it may still be
        in the history this gateway has not read yet (eventlog.py)."""
        if self._arrival_wait(task_id) and not self.eventlog.history_read.is_set():
            reading = (
                "is still reading older ones"
                if self.eventlog.caught_up.is_set()
                else "has not read the event stream yet"  # not connected, or just started
            )
            return HistoryNotRead(
                f"task {task_id!r} is not among the tasks read so far; this gateway {reading}",
                retry_after=2,
            )
        return TaskNotFound(f"no task with id {task_id!r}")

    async def by_idempotency_key(self, owner: str | None, key: str) -> Record | None:
        """The task made earlier with this key, if any. While the history is being read,
        it may be there: waits for it briefly, then 503 rather than a second task."""
        earlier = self.table.by_idempotency_key(owner, key)
        history = self.eventlog.history_read
        if earlier is None and not history.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.arrival_wait):
                    await history.wait()
            earlier = self.table.by_idempotency_key(owner, key)
            if earlier is None and not history.is_set():
                raise HistoryNotRead(
                    "this Idempotency-Key may be an older task's; this gateway is still "
                    "reading older tasks",
                    retry_after=2,
                )
        return earlier

    def _arrival_wait(self, task_id: str) -> float:
        """How long to wait for an unknown id to show up in the stream: only ids that
        could be ours (UUIDs), and only briefly."""
        try:
            uuid.UUID(task_id)
        except ValueError:
            return 0.0
        return self.settings.arrival_wait

    async def cancel(self, record: Record, why: str) -> None:
        """Cancels a task that has not ended. A queued one is announced `cancelled` at
        once (its message is dropped when a worker gets it, or expires); a running one
        is killed by its worker, which announces it. Once the cancel may have reached
        the broker it is the gateway's to finish: what was not confirmed is retried."""
        status = record.status
        if status.state.terminal:
            raise TaskAlreadyEnded(f"task {status.id} has already ended: {status.state.value}")
        self.broker.require_connected()  # refused before anything is sent
        queued = status.state is TaskState.QUEUED
        deadline_ms = record.deadline.epoch_ms if record.deadline else 0
        request = CancelRequest(task_id=status.id, deadline_ms=deadline_ms, announced=queued)
        # a worker drops an announced cancel's task without a word: this event is its end
        announcement = (
            TaskEvent(
                type=EventType.CANCELLED,
                task_id=status.id,
                task=status.task,
                owner=record.owner,
                reason=why,
            )
            if queued
            else None
        )
        try:
            await self.broker.publish_cancel(request)
        except ConfirmLost:
            self.spawn(self._finish_cancel(request, announcement))
        else:
            if announcement is not None:
                try:
                    await self.broker.publish_event(announcement)
                except TimeboxError:
                    self.spawn(self.broker.announce(announcement))
        log.info("cancel %s %s: %s", status.task, status.id, why)

    async def _finish_cancel(self, request: CancelRequest, announcement: TaskEvent | None) -> None:
        """A cancel whose confirm did not come: sent again, then announced."""
        if await self.broker.send_cancel(request) and announcement is not None:
            await self.broker.announce(announcement)

    async def cancel_quietly(self, record: Record, why: str) -> None:
        """A cancel whose caller has gone (the client went away): if the broker cannot
        take it now, it is retried until the task's deadline, not dropped while the
        task burns CPU for nobody."""
        try:
            await self.cancel(record, why)
        except TaskAlreadyEnded:
            pass
        except BrokerUnavailable:
            self.spawn(self._cancel_later(record, why))
        except Exception as exc:
            log.warning("could not cancel %s: %r", record.status.id, exc)

    async def _cancel_later(self, record: Record, why: str) -> None:
        async def attempt() -> None:
            with contextlib.suppress(TaskAlreadyEnded):
                await self.cancel(record, why)

        await until_confirmed(
            attempt,
            f"the cancel of task {record.status.id}",
            log,
            give_up_at=record.deadline.epoch if record.deadline else None,
        )
