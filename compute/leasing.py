"""The broker side of the puller's leases (compute/dispatch.py): a consumer on one task
queue with a prefetch of the slots lent to it, on the worker's task channel; and the
work notices of that queue, which the worker does not hear while it leases."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aio_pika import IncomingMessage
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from compute.dispatch import Deliver
from contracts.background import Background

log = logging.getLogger("timebox.worker.leasing")


class Notices:
    """The work notices a worker that pulls hears: its control queue is bound to the
    work exchange once per task type. A lease mutes its queue's notices — its consumer
    gets every message there, and each notice cost the worker about 0.26 ms of CPU for
    nothing — and unmutes them before the puller looks at that queue again."""

    def __init__(self, queue: AbstractQueue, exchange: str) -> None:
        self._queue = queue  # robust: a reconnect restores the bindings it holds then
        self._exchange = exchange
        self._retrying = Background()

    async def hear(self, task: str) -> None:
        await self._queue.bind(self._exchange, task, timeout=5)

    async def mute(self, task: str) -> None:
        try:
            await self._queue.unbind(self._exchange, task, timeout=5)
        except Exception as exc:  # still bound: the puller ignores them while it leases
            log.debug("notices of %s not muted: %r", task, exc)

    async def unmute(self, task: str) -> None:
        """Returns bound again, or with a retry running (the connection is down: the
        poll finds that queue's messages meanwhile)."""
        try:
            await self.hear(task)
        except Exception:
            self.unmute_soon(task)

    def unmute_soon(self, task: str) -> None:
        self._retrying.spawn(self._retry(task))

    async def _retry(self, task: str) -> None:
        delay = 0.05
        while True:
            try:
                await self.hear(task)
                return
            except Exception as exc:
                log.debug("notices of %s not unmuted yet: %r", task, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@dataclass(eq=False)
class _Consumer:
    task: str
    channel: RawChannel
    closing: asyncio.Future[object]
    on_cancel: Callable[[Basic.Cancel], None]


class QueueConsumers:
    def __init__(self, channel: AbstractChannel, queues: dict[str, str], notices: Notices) -> None:
        self._channel = channel
        self._queues = queues  # task name -> queue name
        self._notices = notices
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
                self._notices.unmute_soon(task)
                lost()

        def on_close(observer: asyncio.Future[object]) -> None:
            if not observer.cancelled():  # cancelled: stop() stopped watching
                gone()

        def on_cancel(frame: Basic.Cancel) -> None:
            if frame.consumer_tag == tag:
                gone()

        consumer = _Consumer(task, raw, raw.closing, on_cancel)
        self._open[tag] = consumer
        consumer.closing.add_done_callback(on_close)
        raw.on_consumer_cancel_callbacks.add(on_cancel)
        await self._notices.mute(task)
        return tag

    def _forget(self, tag: str) -> _Consumer | None:
        consumer = self._open.pop(tag, None)
        if consumer is not None:
            consumer.closing.cancel()
            consumer.channel.on_consumer_cancel_callbacks.discard(consumer.on_cancel)
        return consumer

    async def stop(self, consumer: str) -> None:
        known = self._forget(consumer)
        if known is None:
            return
        try:
            if not known.channel.is_closed:
                await known.channel.basic_cancel(consumer)
                # aiormq's reader gave each delivery before the cancel-ok a task of its
                # own (on_message above) before it read the cancel-ok, and basic_cancel
                # returns two loop turns after that; one more turn for certainty that
                # each has passed its message on. (A message the quorum queue gave the
                # consumer but had not sent yet goes back to the queue, counted as a
                # delivery.)
                await asyncio.sleep(0)
        finally:
            # before the puller's next look at the queue: what is published after that
            # look is announced, what was published before it is found by it
            await self._notices.unmute(known.task)
