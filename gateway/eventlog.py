"""Reads the `{ns}.events` stream from the start of its retention window into the
task table, and keeps following it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from contracts.background import Background
from contracts.events import TaskEvent
from contracts.messages import SYNC_TYPE
from gateway import metrics
from gateway.broker import Broker
from gateway.tasktable import TaskTable

log = logging.getLogger("timebox.gateway.events")

PREFETCH = 2000


class EventLog:
    def __init__(self, broker: Broker, table: TaskTable) -> None:
        self.broker = broker
        self.table = table
        self.caught_up = asyncio.Event()
        self._queue: AbstractQueue | None = None
        self._unacked: AbstractIncomingMessage | None = None
        self._acks = Background()
        # aio-pika restores a consumer (after a reconnect, or when the broker cancels it
        # because a stream member moved) with the arguments it was started with: this
        # dict, which follows the stream, so that it reads on from where it was. From the
        # start again, it would re-read up to an hour of events — measured: 150,000 of
        # them kept a gateway's core busy for most of a minute after each reconnect.
        self._consume_from: dict[str, Any] = {"x-stream-offset": "first"}
        self._next_offset = 0

    async def start(self) -> None:
        assert self.broker.connection is not None
        channel = await self.broker.connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        self._queue = await channel.declare_queue(self.broker.topology.events_stream, passive=True)
        await self._queue.consume(self._on_message, arguments=self._consume_from)
        await self.broker.publish_sync_marker()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            metrics.EVENTS_READ.inc()
            if offset >= self._next_offset:
                self._next_offset = offset + 1
                self._consume_from["x-stream-offset"] = self._next_offset
        try:
            if message.type == SYNC_TYPE:
                if message.body.decode(errors="replace") == self.broker.instance:
                    self.caught_up.set()
            elif isinstance(offset, int) and offset > self.table.last_offset:
                self.table.apply(offset, TaskEvent.model_validate_json(message.body))
        except ValidationError as exc:
            log.warning("skipping an unreadable event at offset %s: %s", offset, exc)
        finally:
            self._ack_soon(message)

    def _ack_soon(self, message: AbstractIncomingMessage) -> None:
        """One ack (`multiple`) for the messages handled in one turn of the loop: one
        frame for the broker to handle instead of one per event."""
        pending = self._unacked is not None
        self._unacked = message
        if not pending:
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        message, self._unacked = self._unacked, None
        if message is not None:
            self._acks.spawn(self._ack(message))

    @staticmethod
    async def _ack(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(Exception):  # a channel closed since: nothing to ack
            await message.ack(multiple=True)
