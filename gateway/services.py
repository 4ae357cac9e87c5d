"""What the routes share: settings, the broker, the task table, and the cancel rule."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from contracts.background import Background
from contracts.errors import TaskAlreadyEnded, TaskNotFound
from contracts.events import EventType, TaskEvent, TaskState
from contracts.messages import CancelRequest
from gateway.admission import Admission
from gateway.auth import Auth
from gateway.broker import Broker
from gateway.eventlog import EventLog
from gateway.settings import GatewaySettings
from gateway.tasktable import Record, TaskTable

log = logging.getLogger("timebox.gateway")


@dataclass
class Services:
    settings: GatewaySettings
    broker: Broker
    table: TaskTable
    eventlog: EventLog
    admission: Admission
    auth: Auth
    background: Background = field(default_factory=Background)
    # set by sse-starlette when the server is asked to stop
    shutting_down: anyio.Event = field(default_factory=anyio.Event)

    async def end_streams_on_shutdown(self) -> None:
        await self.shutting_down.wait()
        closed = self.table.close_subscriptions()
        log.info("shutting down: ended %d event streams", closed)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.background.spawn(coro)

    async def find(self, task_id: str, owner: str | None) -> Record:
        wait = self._arrival_wait(task_id)
        record = await self.table.arrival(task_id, wait)
        if record is not None and record.owner != owner:
            await asyncio.sleep(wait)  # as slow as an unknown id: existence does not leak
        if record is None or record.owner != owner:
            raise TaskNotFound(f"no task with id {task_id!r}")
        return record

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
        is killed by its worker, which announces it."""
        status = record.status
        if status.state.terminal:
            raise TaskAlreadyEnded(f"task {status.id} has already ended: {status.state.value}")
        queued = status.state is TaskState.QUEUED
        deadline_ms = int(status.deadline.timestamp() * 1000) if status.deadline else 0
        await self.broker.publish_cancel(
            CancelRequest(task_id=status.id, deadline_ms=deadline_ms, announced=queued)
        )
        if queued:
            await self.broker.publish_event(
                TaskEvent(
                    type=EventType.CANCELLED,
                    task_id=status.id,
                    task=status.task,
                    owner=record.owner,
                    reason=why,
                )
            )
        log.info("cancel %s %s: %s", status.task, status.id, why)

    async def cancel_quietly(self, record: Record, why: str) -> None:
        try:
            await self.cancel(record, why)
        except TaskAlreadyEnded:
            pass
        except Exception as exc:
            log.warning("could not cancel %s: %r", record.status.id, exc)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
