"""How the gateway and the workers connect to RabbitMQ: a robust aio-pika connection
whose frames are written to the socket once per event-loop turn (aiormq writes each
command on its own, and each write can wake the broker; docs/performance.md), and
confirmed publishes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.connection import make_url
from aiormq.abc import ConfirmationFrameType
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError
from yarl import URL

from contracts.events import TaskEvent
from contracts.messages import (
    CONTENT_TYPE,
    DELIVERY_COUNT_HEADER,
    EVENT_TYPE,
    PARK_REASON_HEADER,
    PARKED_AT_HEADER,
    PARKED_DELIVERIES_HEADER,
)
from runtime.logs import log_reconnects

PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
TRANSIENT = int(aio_pika.DeliveryMode.NOT_PERSISTENT)


class CoalescingWriter(asyncio.StreamWriter):
    """A StreamWriter that hands its transport everything written during one turn of
    the event loop as a single write."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.StreamReaderProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._event_loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._event_loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self.transport.is_closing():
            super().write(data)

    # aiormq drains after every publish and ack: flushing here would undo the gathering.
    # drain() only waits while the transport's own buffer is over its high-water mark,
    # and what waits here is at most one turn's frames.

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTransportFactory(TransportFactory):
    """aiormq's transport factory (TCP, or TLS for amqps://) with a CoalescingWriter."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        provider = kwargs.pop("ssl_context_provider", None)
        ssl = await provider.get_context() if url.scheme == "amqps" and provider else None
        loop = asyncio.get_running_loop()
        # aiormq has put the scheme's default port in the URL already
        host, port = url.host or "localhost", url.port or 5672
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, host=host, port=port, ssl=ssl, **kwargs
            )
        except OSError as e:
            raise AMQPConnectionError(*e.args) from e
        return reader, CoalescingWriter(transport, protocol, reader, loop)


class CoalescingRobustConnection(aio_pika.RobustConnection):
    # aio-pika keeps only the connection parameters it knows from the keyword
    # arguments; the factory goes in after, and every reconnect uses it again
    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory()


async def connect(
    url: str,
    name: str,
    *,
    heartbeat: int,
    reconnect_interval: float,
    log: logging.Logger,
) -> AbstractRobustConnection:
    """A robust connection named `name` in the management UI, whose losses and
    recoveries are logged on `log`. A broker that does not answer yet is waited for,
    tried every `reconnect_interval`: a program started before RabbitMQ, or during
    its restart, comes up and connects once it can, rather than exiting."""
    # the options go in the URL: aiormq takes the heartbeat from there, aio-pika the rest
    connection = CoalescingRobustConnection(
        make_url(url, heartbeat=heartbeat, reconnect_interval=reconnect_interval, fail_fast=False),
        client_properties={"connection_name": name},
    )
    try:
        await connection.connect()
    except BaseException:  # cancelled while waiting: its reconnect loop must stop too
        await connection.close()
        raise
    log_reconnects(connection, log)
    return connection


async def publish(
    channel: AbstractChannel,
    body: bytes,
    properties: aiormq.spec.Basic.Properties,
    *,
    exchange: str = "",
    routing_key: str,
    mandatory: bool = False,
    confirm_within: float,
) -> ConfirmationFrameType | None:
    """Publishes and waits for the broker's confirm (on a channel without confirms, for
    nothing), straight through aiormq's channel under `channel`: an aio_pika.Message
    costs about twenty attribute sets, each behind a lock check, and a task costs a
    worker two messages out and the gateway three.
    As through aio-pika, a closed channel raises at once, a nack raises DeliveryError
    and an unroutable `mandatory` message PublishError (when the channel was opened
    with `on_return_raises`)."""
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    async with asyncio.timeout(confirm_within):  # a robust channel waits for a reconnect
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)  # the abstract one does not declare `wait`
        return await raw.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            wait=False,  # the confirm comes after the frames are written: no drain to wait for
        )


async def until_confirmed(
    publish: Callable[[], Awaitable[object]],
    what: str,
    log: logging.Logger,
    *,
    give_up_at: float | None = None,
) -> bool:
    """Calls `publish` until it returns (the broker has confirmed), across reconnects:
    for a message that must not be lost to an outage, such as an outcome. Returns False
    if `give_up_at` (epoch seconds) passed first, once the message no longer matters.
    The first failure is logged as a warning, the retries that follow at debug level:
    the outage has its own line."""
    delay, failures = 0.05, 0
    while True:
        try:
            await publish()
            if failures:
                log.info("published %s after %d failed attempts", what, failures)
            return True
        except Exception as exc:
            failures += 1
            if give_up_at is not None and time.time() + delay >= give_up_at:
                log.warning("gave up publishing %s: it no longer matters (%s)", what, exc)
                return False
            log.log(
                logging.WARNING if failures == 1 else logging.DEBUG,
                "publishing %s failed (%s); retrying until the broker confirms it",
                what,
                exc,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


def parked_copy(message: AbstractIncomingMessage, reason: str) -> aio_pika.Message:
    """A message as it goes to `{ns}.parked` for a person to inspect and act on: as
    received, with why, when and after how many deliveries it was parked, and an id
    (its task's, or a new one)."""
    headers = dict(message.headers or {})
    delivered = headers.get(DELIVERY_COUNT_HEADER)  # the redeliveries before this one
    headers[PARK_REASON_HEADER] = reason[:1000]
    headers[PARKED_AT_HEADER] = round(time.time() * 1000)
    headers[PARKED_DELIVERIES_HEADER] = 1 + (delivered if isinstance(delivered, int) else 0)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.message_id or uuid.uuid4().hex,
        type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish_event(
    channel: AbstractChannel, stream: str, event: TaskEvent, *, confirm_within: float
) -> ConfirmationFrameType | None:
    """Appends `event` to the events stream, confirmed."""
    return await publish(
        channel,
        event.model_dump_json(exclude_none=True).encode(),
        # new each time: aiormq writes a message id into the properties it is given
        aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE, message_type=EVENT_TYPE, delivery_mode=PERSISTENT
        ),
        routing_key=stream,
        confirm_within=confirm_within,
    )
