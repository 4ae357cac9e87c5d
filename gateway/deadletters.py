"""Reads `{ns}.dead`: a plain expiry becomes the task's `expired` event; anything
else is a `failed` event and a copy in `{ns}.parked` with its reason."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from contracts.events import ErrorInfo, EventType, TaskEvent
from gateway.broker import Broker
from gateway.parked import owner_of
from gateway.tasktable import TaskTable
from runtime.amqp import until_confirmed

log = logging.getLogger("timebox.gateway.deadletters")


def death_reason(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason")
    else:
        reason = headers.get("x-first-death-reason")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    return str(reason) if reason else "unknown"


class DeadLetters:
    def __init__(self, broker: Broker, table: TaskTable) -> None:
        self.broker = broker
        self.table = table

    async def start(self) -> None:
        assert self.broker.connection is not None
        channel = await self.broker.connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(self.broker.topology.dead_queue, passive=True)
        await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        event = await self._ending(message)
        if event is not None:
            await self.broker.announce(event)  # nobody else will say how it ended
        # acked once its event is confirmed; a channel lost meanwhile redelivers it (to
        # this gateway or another), and a second event after the first is ignored
        with contextlib.suppress(Exception):
            await message.ack()

    async def _ending(self, message: AbstractIncomingMessage) -> TaskEvent | None:
        """The event that ends the task of a dead letter (parked, if it is not a plain
        expiry); None when there is none to tell."""
        headers = dict(message.headers or {})
        reason = death_reason(headers)
        why = f"dead-lettered by the broker ({reason})"
        if reason != "expired":
            await until_confirmed(
                lambda: self.broker.publish_parked(message, why), f"a parked copy of {why}", log
            )
            log.warning("parked message %s (%s): %s", message.message_id, message.type, why)
        task_id, task = message.message_id, message.type
        if not task_id or not task:
            return None
        ids = {"task_id": task_id, "task": task, "owner": owner_of(message)}
        if reason != "expired":
            error = ErrorInfo(type="DeadLettered", message=why)
            return TaskEvent(type=EventType.FAILED, error=error, reason=why, **ids)
        record = self.table.get(task_id)
        if record is not None and record.status.state.terminal:
            return None
        why = "expired in the queue before a worker could start it"
        return TaskEvent(type=EventType.EXPIRED, reason=why, **ids)
