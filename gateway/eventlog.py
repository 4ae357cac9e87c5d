"""Reads the `{ns}.events` stream into the task table, and the workers' announcements
into the fleet, and keeps following it.

The live window first (the longest timeout: every task that can still run), then the
history before it, on another connection, while the gateway serves. The stream is read
on a connection of its own, so that an alarm holding the publishing one does not hold
back its acks, and through aiormq rather than aio-pika's consumer (a quarter less CPU
an event). Whatever ends the consumer, it connects again and reads on from the next
offset, not from the start of the retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pydantic import ValidationError
from yarl import URL

from contracts.events import TaskEvent
from contracts.messages import SYNC_TYPE, WORKER_TYPE, WorkerAnnouncement
from gateway import metrics
from gateway.broker import Broker
from gateway.fleet import Fleet
from gateway.tasktable import TaskTable
from runtime.background import Background

log = logging.getLogger("timebox.gateway.events")

PREFETCH = 2000
# the history is read while the gateway serves: each batch the broker sends at once is
# folded in one turn of the loop, which nothing else gets meanwhile
HISTORY_PREFETCH = 200
ACK_AFTER = 0.005  # seconds

# beyond the maximum timeout: stream timestamps are whole seconds of the broker's clock
LIVE_WINDOW_MARGIN = 1.0

Ends = tuple[asyncio.Future[Any], ...]
T = TypeVar("T")
OnDelivery = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]


class EventLog:
    def __init__(self, broker: Broker, table: TaskTable, fleet: Fleet) -> None:
        self.broker = broker
        self.table = table
        self.fleet = fleet
        self.caught_up = asyncio.Event()
        self.history_read = asyncio.Event()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._next_offset: int | None = None  # None: the start of the live window
        self._history_end: int | None = None  # the first offset read live
        self._acks = Acks(PREFETCH)
        self._following: asyncio.Task[None] | None = None
        self._history: asyncio.Task[None] | None = None

    @property
    def reading(self) -> bool:
        """Consuming the stream now (False while it reconnects)."""
        return self._channel is not None and not self._channel.is_closed

    async def start(self) -> None:
        ends = await self._until_open("the event stream", self._consume)
        self._following = asyncio.create_task(self._follow(ends))
        self._history = asyncio.create_task(self._read_history())
        await self.broker.publish_sync_marker()

    async def close(self) -> None:
        for task in (self._following, self._history):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._disconnect()
        await self._acks.close()

    def live_window_start(self) -> datetime:
        settings = self.broker.settings
        longest = max(
            [settings.max_timeout, *(t.max_timeout or 0 for t in self.fleet.tasks.values())]
        )
        window = longest + settings.clock_skew + LIVE_WINDOW_MARGIN
        return datetime.fromtimestamp(time.time() - window, tz=UTC)

    async def _consume(self) -> Ends:
        """Connects and consumes from the next offset to read. Returns the futures of
        which one completes when the consumer ends."""
        offset = self.live_window_start() if self._next_offset is None else self._next_offset
        connection, channel, ends = await self._open("events", offset, PREFETCH, self._on_delivery)
        self._connection, self._channel = connection, channel
        return ends

    async def _open(
        self, what: str, offset: int | str | datetime, prefetch: int, on_delivery: OnDelivery
    ) -> tuple[AbstractConnection, AbstractChannel, Ends]:
        """A connection of its own consuming the stream from `offset`, and the futures
        of which one completes when the consumer ends."""
        settings = self.broker.settings
        url = URL(settings.amqp_url).update_query(heartbeat=settings.heartbeat)
        name = f"{self.broker.name} {what}"
        # a link that accepts and then says nothing must not hold the reconnect for long
        async with asyncio.timeout(max(5.0, 2.0 * settings.heartbeat)):
            connection = await aiormq.connect(url, client_properties={"connection_name": name})
            try:
                channel = await connection.channel()
                await channel.basic_qos(prefetch_count=prefetch)
                ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

                def cancelled(_: object) -> None:
                    if not ended.done():
                        ended.set_result("the broker cancelled the consumer")

                channel.on_consumer_cancel_callbacks.add(cancelled)
                await channel.basic_consume(
                    self.broker.topology.events_stream,
                    on_delivery,
                    arguments={"x-stream-offset": offset},
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
        return connection, channel, (ended, connection.closing, channel.closing)

    async def _follow(self, ends: Ends) -> None:
        """Consumes again whenever the consumer ends, until closed."""
        while True:
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            reason = _why(done.pop())
            log.warning(
                "stopped reading the event stream (%s); reading on from offset %s once back",
                reason,
                self._next_offset,
            )
            await self._disconnect()
            ends = await self._until_open("the event stream", self._consume)
            log.warning("reading the event stream again, from offset %s", self._next_offset)

    async def _until_open(self, what: str, open_: Callable[[], Awaitable[T]]) -> T:
        """Calls `open_` until it connects (the broker may still be away), every
        reconnect interval, with one line for the wait."""
        told = False
        while True:
            try:
                return await open_()
            except Exception as exc:
                if not told:
                    log.warning("cannot read %s yet (%r); retrying", what, exc)
                    told = True
                await asyncio.sleep(self.broker.settings.reconnect_interval)

    async def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        offset = _offset(message)
        if offset is not None:
            metrics.EVENTS_READ.inc()
            if self._next_offset is None or offset >= self._next_offset:
                self._next_offset = offset + 1
            if self._history_end is None:
                self._history_end = offset
        kind = message.header.properties.message_type
        try:
            if kind == SYNC_TYPE:
                if message.body.decode(errors="replace") == self.broker.instance:
                    self.caught_up.set()
            elif kind == WORKER_TYPE:
                with contextlib.suppress(ValidationError):
                    self.fleet.heard(WorkerAnnouncement.model_validate_json(message.body))
            elif offset is not None and offset > self.table.last_offset:
                event = _event(message, offset)
                if event is not None:
                    self.table.apply(offset, event, message.body)
        finally:
            self._acks.soon(message)

    # -- the history ---------------------------------------------------------------

    async def _read_history(self) -> None:
        """Once caught up with the live window, reads the events before it into the
        table, on a connection of its own (again from where it was, if that is lost)."""
        await self.caught_up.wait()
        end = self._history_end
        assert end is not None  # the sync marker was read live, if nothing else
        started, read = time.monotonic(), 0
        next_offset: int | str = "first"
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acks = Acks(HISTORY_PREFETCH)

        async def on_delivery(message: DeliveredMessage) -> None:
            nonlocal next_offset, read
            offset = _offset(message)
            try:
                if offset is None:
                    return
                if offset >= end:
                    if not reached.done():
                        reached.set_result(None)
                    return
                next_offset = offset + 1
                read += 1
                metrics.EVENTS_READ.inc()
                if message.header.properties.message_type not in (SYNC_TYPE, WORKER_TYPE):
                    event = _event(message, offset)
                    if event is not None:
                        self.table.recall(offset, event, message.body)
            finally:
                acks.soon(message)

        def open_() -> Awaitable[tuple[AbstractConnection, AbstractChannel, Ends]]:
            return self._open("history", next_offset, HISTORY_PREFETCH, on_delivery)

        try:
            while end > 0 and not reached.done():
                connection, _, ends = await self._until_open("the event history", open_)
                try:
                    done, _ = await asyncio.wait(
                        (reached, *ends), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    with contextlib.suppress(Exception):
                        await connection.close()
                if not reached.done():
                    log.warning(
                        "stopped reading the event history (%s); reading on from offset %s",
                        _why(done.pop()),
                        next_offset,
                    )
                    await asyncio.sleep(self.broker.settings.reconnect_interval)
        finally:
            await acks.close()
        self.history_read.set()
        log.info(
            "read the event history: %d events before offset %d in %.1f s",
            read,
            end,
            time.monotonic() - started,
        )


class Acks:
    """Acks (`multiple`) in batches. On a stream an ack only gives the consumer credit
    (nothing is redelivered for want of one), and one ack a loop turn was a write(2)
    for a few events, 15 % of a gateway's time reading at startup."""

    def __init__(self, prefetch: int) -> None:
        # credit back well before the broker stops at the prefetch, and soon when quiet
        self._every = prefetch // 4
        self._unacked: tuple[AbstractChannel, int] | None = None
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending = Background()

    def soon(self, message: DeliveredMessage) -> None:
        if message.delivery_tag is None:
            return
        if self._unacked is not None and self._unacked[0] is not message.channel:
            self._flush()  # a new channel's tags say nothing about the old one's
        self._unacked = (message.channel, message.delivery_tag)
        self._count += 1
        if self._count >= self._every:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_AFTER, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        unacked, self._unacked, self._count = self._unacked, None, 0
        if unacked is not None:
            self._sending.spawn(_ack(*unacked))

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        await self._sending.cancel()


def _offset(message: DeliveredMessage) -> int | None:
    offset = (message.header.properties.headers or {}).get("x-stream-offset")
    return offset if isinstance(offset, int) else None


def _event(message: DeliveredMessage, offset: int) -> TaskEvent | None:
    """The event in a delivery; None (and a warning) if it cannot be read."""
    try:
        return TaskEvent.model_validate_json(message.body)
    except ValidationError as exc:
        log.warning("skipping an unreadable event at offset %s: %s", offset, exc)
        return None


async def _ack(channel: AbstractChannel, delivery_tag: int) -> None:
    with contextlib.suppress(Exception):  # a channel closed since: nothing to ack
        await channel.basic_ack(delivery_tag, multiple=True)


def _why(end: asyncio.Future[Any]) -> str:
    if end.cancelled():
        return "closed"
    error = end.exception()
    if error is not None:
        return str(error) or repr(error)
    return str(end.result() or "closed")
