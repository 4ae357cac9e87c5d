"""The broker side of the puller's leases (compute/dispatch.py): a consumer on one task
queue with a prefetch of the slots lent to it, on the worker's task channel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aio_pika import IncomingMessage
from aio_pika.abc import AbstractChannel
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from compute.dispatch import Deliver
from contracts.declare import counts


@dataclass(eq=False)
class _Consumer:
    channel: RawChannel
    closing: asyncio.Future[object]
    on_cancel: Callable[[Basic.Cancel], None]


class QueueConsumers:
    def __init__(self, channel: AbstractChannel, queues: dict[str, str]) -> None:
        self._channel = channel
        self._queues = queues  # task name -> queue name
        self._open: dict[str, _Consumer] = {}

    async def start(
        self, task: str, prefetch: int, deliver: Deliver, lost: Callable[[], None]
    ) -> str:
        # The raw channel, not aio-pika's robust one: a robust channel would re-create
        # the consumer after a reconnect with its old prefetch, while the slots lent to
        # it may be busy by then; the lease ends with the channel instead.
        raw = await self._channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=prefetch)  # per consumer, for those started next

        async def on_message(message: DeliveredMessage) -> None:
            deliver(IncomingMessage(message, no_ack=False))

        ok = await raw.basic_consume(self._queues[task], on_message)
        tag = ok.consumer_tag
        assert tag is not None

        def gone() -> None:  # the channel closed, or the broker cancelled the consumer
            if self._forget(tag) is not None:
                lost()

        def on_close(observer: asyncio.Future[object]) -> None:
            if not observer.cancelled():  # cancelled: stop() stopped watching
                gone()

        def on_cancel(frame: Basic.Cancel) -> None:
            if frame.consumer_tag == tag:
                gone()

        consumer = _Consumer(raw, raw.closing, on_cancel)
        self._open[tag] = consumer
        consumer.closing.add_done_callback(on_close)
        raw.on_consumer_cancel_callbacks.add(on_cancel)
        return tag

    def _forget(self, tag: str) -> _Consumer | None:
        consumer = self._open.pop(tag, None)
        if consumer is not None:
            consumer.closing.cancel()
            consumer.channel.on_consumer_cancel_callbacks.discard(consumer.on_cancel)
        return consumer

    async def stop(self, consumer: str) -> None:
        known = self._forget(consumer)
        if known is None or known.channel.is_closed:
            return
        await known.channel.basic_cancel(consumer)
        # aiormq's reader gave each delivery before the cancel-ok a task of its own
        # (on_message above) before it read the cancel-ok, and basic_cancel returns two
        # loop turns after that; one more turn for certainty that each has passed its
        # message on. (A message the quorum queue gave the consumer but had not sent yet
        # goes back to the queue, counted as a delivery.)
        await asyncio.sleep(0)

    async def ready(self, task: str) -> int:
        return (await counts(self._channel, self._queues[task]))[0]
