"""Which tasks have a client following them, across gateways.

A task submitted as an event stream (a POST with `Accept: text/event-stream`), or
waited for by an RPC with an Idempotency-Key, is its client's: once no client follows
it for `stream_grace` seconds it is cancelled as abandoned. Behind a load balancer the
client may come back to another gateway (to the task's events with `Last-Event-ID`, or
with the same key), and may leave that one too. So every gateway says which such tasks
it serves on `{ns}.gateways` (each gateway has its own queue bound there): at once when
a client starts following a task there, and again every half grace while one does. A
gateway whose client left cancels the task only after a whole grace in which no client
followed it there and no other gateway said it serves it."""

from __future__ import annotations

import asyncio
import logging
import time

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from contracts.background import Background
from contracts.messages import WatchNotice
from gateway.broker import Broker
from gateway.tasktable import Record, TaskTable

log = logging.getLogger("timebox.gateway.watches")


class Watches:
    def __init__(self, broker: Broker, table: TaskTable, grace: float) -> None:
        self.broker = broker
        self.table = table
        self.grace = grace
        self._sending = Background()
        self._followed: set[Record] = set()  # tasks a client may abandon, followed here

    async def start(self) -> None:
        assert self.broker.connection is not None
        channel = await self.broker.connection.channel()
        exchange = await channel.get_exchange(self.broker.topology.gateways_exchange)
        # a name of our own, so that a reconnect re-declares the same queue
        queue = await channel.declare_queue(
            f"{exchange.name}.{self.broker.name}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)
        self._sending.spawn(self._renew())

    async def close(self) -> None:
        await self._sending.cancel()

    def follow(self, record: Record, *, tell: bool = True) -> None:
        """A client starts following `record`'s task here (its events, or an RPC's wait
        for it). Unless `tell` is False (a task just submitted here: nobody else can
        have it yet), the other gateways hear of it now, at most once per half grace."""
        if record.status.state.terminal:
            return
        if record.streamed or record.idempotency_key is not None:
            self._followed.add(record)
        now = time.monotonic()
        if tell and now - record.told_watched >= self.grace / 2:
            record.told_watched = now
            self._sending.spawn(self.broker.send_watch_notice([record.status.id]))

    def followed_elsewhere(self, record: Record) -> bool:
        """Whether another gateway said within the last grace that it serves the task."""
        return record.watched_elsewhere > time.monotonic() - self.grace

    async def _renew(self) -> None:
        """Every half grace, one notice of the tasks that a client follows here."""
        if self.grace <= 0:
            return  # no grace: a client that leaves is never waited for
        while True:
            await asyncio.sleep(max(self.grace / 2, 0.1))
            for record in list(self._followed):
                if record.status.state.terminal or not (record.subscribers or record.waiting):
                    self._followed.discard(record)
            if self._followed:
                task_ids = [record.status.id for record in self._followed]
                await self.broker.send_watch_notice(task_ids)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.app_id == self.broker.name:
            return  # its own: its subscribers are counted where they are
        try:
            notice = WatchNotice.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("ignored a malformed watch notice: %s", exc)
            return
        now = time.monotonic()
        for task_id in notice.task_ids:
            record = self.table.get(task_id)
            if record is not None:
                record.watched_elsewhere = now
