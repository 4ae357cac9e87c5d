"""Reads the `{ns}.events` stream from the start of its retention window into the
task table, and keeps following it, on a broker connection of its own.

A connection of its own: while a memory or disk alarm lasts, RabbitMQ stops reading
from every connection that publishes. Acks sent on the gateway's publishing connection
would wait with its publishes, the stream would stop delivering once the prefetch is
used up, and callers waiting for outcomes the workers still report would wait too.

Through aiormq, not aio-pika's consumer: for each delivery aio-pika builds an
IncomingMessage (twenty-odd attribute sets) and starts a second task, about a quarter
of the CPU reading an event costs (measured: 162-169 against 226-237 µs an event).
Restoring the consumer is then ours to do, and it is done one way for every way it can
end — the connection lost, the channel closed, the broker cancelling the consumer
because a stream member moved: close the connection, connect again, and consume from
the next offset to read, not from the start. From the start, every reconnect would
re-read up to an hour of events (measured: 150,000 of them kept a gateway's core busy
for most of a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pydantic import ValidationError
from yarl import URL

from contracts.background import Background
from contracts.events import TaskEvent
from contracts.messages import SYNC_TYPE
from gateway import metrics
from gateway.broker import Broker
from gateway.tasktable import TaskTable

log = logging.getLogger("timebox.gateway.events")

PREFETCH = 2000
# credit back well before the broker stops at PREFETCH unacked, and soon when it goes quiet
ACK_EVERY = PREFETCH // 4
ACK_AFTER = 0.005  # seconds

Ends = tuple[asyncio.Future[Any], ...]


class EventLog:
    def __init__(self, broker: Broker, table: TaskTable) -> None:
        self.broker = broker
        self.table = table
        self.caught_up = asyncio.Event()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._next_offset: int | None = None  # None: the first in the stream
        self._unacked: tuple[AbstractChannel, int] | None = None
        self._unacked_count = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._acks = Background()
        self._following: asyncio.Task[None] | None = None

    @property
    def reading(self) -> bool:
        """Consuming the stream now (False while it reconnects)."""
        return self._channel is not None and not self._channel.is_closed

    async def start(self) -> None:
        ends = await self._consume()
        self._following = asyncio.create_task(self._follow(ends))
        await self.broker.publish_sync_marker()

    async def close(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
        await self._disconnect()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        await self._acks.cancel()

    async def _consume(self) -> Ends:
        """Connects and consumes from the next offset to read. Returns the futures of
        which one completes when the consumer ends."""
        settings = self.broker.settings
        url = URL(settings.amqp_url).update_query(heartbeat=settings.heartbeat)
        name = f"{self.broker.name} events"
        # a link that accepts and then says nothing must not hold the reconnect for long
        async with asyncio.timeout(max(5.0, 2.0 * settings.heartbeat)):
            connection = await aiormq.connect(url, client_properties={"connection_name": name})
            try:
                channel = await connection.channel()
                await channel.basic_qos(prefetch_count=PREFETCH)
                ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

                def cancelled(_: object) -> None:
                    if not ended.done():
                        ended.set_result("the broker cancelled the consumer")

                channel.on_consumer_cancel_callbacks.add(cancelled)
                offset = "first" if self._next_offset is None else self._next_offset
                await channel.basic_consume(
                    self.broker.topology.events_stream,
                    self._on_delivery,
                    arguments={"x-stream-offset": offset},
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
        self._connection, self._channel = connection, channel
        return (ended, connection.closing, channel.closing)

    async def _follow(self, ends: Ends) -> None:
        """Consumes again whenever the consumer ends, until closed."""
        interval = self.broker.settings.reconnect_interval
        while True:
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            reason = _why(done.pop())
            log.warning(
                "stopped reading the event stream (%s); reading on from offset %s once back",
                reason,
                self._next_offset,
            )
            await self._disconnect()
            told = False
            while True:
                try:
                    ends = await self._consume()
                    break
                except Exception as exc:  # the broker still away: try again
                    if not told:
                        log.warning("cannot read the event stream yet (%r); retrying", exc)
                        told = True
                    await asyncio.sleep(interval)
            log.warning("reading the event stream again, from offset %s", self._next_offset)

    async def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        offset = (properties.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            metrics.EVENTS_READ.inc()
            if self._next_offset is None or offset >= self._next_offset:
                self._next_offset = offset + 1
        try:
            if properties.message_type == SYNC_TYPE:
                if message.body.decode(errors="replace") == self.broker.instance:
                    self.caught_up.set()
            elif isinstance(offset, int) and offset > self.table.last_offset:
                self.table.apply(offset, TaskEvent.model_validate_json(message.body))
        except ValidationError as exc:
            log.warning("skipping an unreadable event at offset %s: %s", offset, exc)
        finally:
            if message.delivery_tag is not None:
                self._ack_soon(message.channel, message.delivery_tag)

    def _ack_soon(self, channel: AbstractChannel, delivery_tag: int) -> None:
        """Acks (`multiple`) in batches. On a stream an ack only gives the consumer
        credit (nothing is redelivered for want of one), and one ack a loop turn was
        a write(2) for a few events, 15 % of a gateway's time reading at startup."""
        if self._unacked is not None and self._unacked[0] is not channel:
            self._flush_acks()  # a new channel's tags say nothing about the old one's
        self._unacked = (channel, delivery_tag)
        self._unacked_count += 1
        if self._unacked_count >= ACK_EVERY:
            self._flush_acks()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_AFTER, self._flush_acks)

    def _flush_acks(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        unacked, self._unacked, self._unacked_count = self._unacked, None, 0
        if unacked is not None:
            self._acks.spawn(_ack(*unacked))


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
