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
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from contracts.background import Background
from contracts.events import EventType, TaskEvent
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
        self.renew_every = max(grace / 2, 0.1) if grace > 0 else 1.0
        self.orphaned_after = 4 * self.renew_every
        # streamed tasks that have not ended, and when a client was last seen following
        # each (time.monotonic()); filled from the event stream by `observe`
        self._streamed: dict[Record, float] = {}
        self._listening_since: float | None = None

    def observe(self, record: Record, event: TaskEvent) -> None:
        """A table listener: every streamed task read live, or queued here."""
        if event.type is EventType.QUEUED and record.streamed:
            self._streamed.setdefault(record, time.monotonic())

    async def start(
        self,
        cancel: Callable[[Record, str], Awaitable[None]],
        listening: Callable[[], bool],
    ) -> None:
        """Starts hearing and sending notices, and sweeping orphaned tasks: `cancel`
        cancels one, while `listening` says the event stream and notices are read."""
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
        self._sending.spawn(self._sweep(cancel, listening))

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
        while True:
            await asyncio.sleep(self.renew_every)
            for record in list(self._followed):
                if record.status.state.terminal or not (record.subscribers or record.waiting):
                    self._followed.discard(record)
            if self._followed:
                task_ids = [record.status.id for record in self._followed]
                await self.broker.send_watch_notice(task_ids)

    async def _sweep(
        self,
        cancel: Callable[[Record, str], Awaitable[None]],
        listening: Callable[[], bool],
    ) -> None:
        why = (
            f"orphaned: no client followed its event stream through any gateway for "
            f"{self.orphaned_after:g} s (its gateway may have stopped)"
        )
        while True:
            await asyncio.sleep(self.renew_every)
            for record in self.orphans(listening()):
                await cancel(record, why)

    def orphans(self, listening: bool) -> list[Record]:
        """The streamed tasks no client has followed anywhere for `orphaned_after`
        seconds of listening for notices; those that ended are forgotten."""
        now = time.monotonic()
        if not listening:  # notices may be missed: the wait starts again once back
            self._listening_since = None
            return []
        if self._listening_since is None:
            self._listening_since = now
        orphans = []
        for record, followed in list(self._streamed.items()):
            deadline = record.status.deadline
            if record.status.state.terminal or (deadline and deadline.timestamp() < time.time()):
                del self._streamed[record]
            elif record.subscribers or record.waiting:
                self._streamed[record] = now
            elif record.abandon_check:
                pass  # its client left here: that check decides, after one grace
            elif now - max(followed, record.watched_elsewhere, self._listening_since) >= (
                self.orphaned_after
            ):
                del self._streamed[record]
                orphans.append(record)
        return orphans

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
