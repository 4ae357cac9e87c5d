"""A lease's consumer on the real broker: at most its prefetch, every delivery before its
cancel passed on when the cancel returns, and its end noticed when the broker cancels it
or its channel goes; the work notices of its queue muted while it lasts."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic

from compute.leasing import Notices, QueueConsumers
from contracts.amqp import connect
from contracts.declare import counts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    robust = await connect(
        amqp_url, "test", heartbeat=10, reconnect_interval=1, log=logging.getLogger("test")
    )
    async with robust:
        yield robust


@pytest.fixture
async def quorum_queue(
    connection: AbstractRobustConnection,
) -> AsyncIterator[tuple[AbstractChannel, str]]:
    channel = await connection.channel(publisher_confirms=True)
    name = f"tbtest-lease-{uuid.uuid4().hex[:8]}"
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        yield channel, name
    finally:
        other = await connection.channel()
        await other.queue_delete(name, if_unused=False, if_empty=False)
        await other.exchange_delete(f"{name}.work")


class WatchedNotices(Notices):
    """Sets `heard` each time a binding for notices goes through."""

    def __init__(self, queue: AbstractQueue, exchange: str) -> None:
        super().__init__(queue, exchange)
        self.heard = asyncio.Event()

    async def hear(self, task: str) -> None:
        await super().hear(task)
        self.heard.set()


@pytest.fixture
async def notices(
    connection: AbstractRobustConnection, quorum_queue: tuple[AbstractChannel, str]
) -> WatchedNotices:
    """A worker's control queue, on a channel of its own, hearing the notices of "t"."""
    _, name = quorum_queue
    control = await connection.channel()
    await control.declare_exchange(f"{name}.work", aio_pika.ExchangeType.DIRECT)
    heard = WatchedNotices(await control.declare_queue(exclusive=True), f"{name}.work")
    await heard.hear("t")
    return heard


async def routed(connection: AbstractRobustConnection, exchange: str, key: str) -> bool:
    """Whether a notice published now reaches some queue (an unroutable one comes back)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        target = await channel.get_exchange(exchange)
        result = await target.publish(aio_pika.Message(b"{}"), key, mandatory=True)
        return isinstance(result, Basic.Ack)
    finally:
        await channel.close()


async def publish(channel: AbstractChannel, queue: str, count: int) -> None:
    for i in range(count):
        await channel.default_exchange.publish(aio_pika.Message(str(i).encode()), queue)


async def test_every_delivery_before_the_cancel_is_passed_on_when_stop_returns(
    quorum_queue: tuple[AbstractChannel, str], notices: Notices
) -> None:
    channel, name = quorum_queue
    consumers = QueueConsumers(channel, {"t": name}, notices)
    for _ in range(20):  # an ack lets the broker send the next one just as the cancel goes
        await publish(channel, name, 3)
        got: list[AbstractIncomingMessage] = []
        two = asyncio.Event()

        def deliver(message: AbstractIncomingMessage, got=got, two=two) -> None:  # type: ignore[no-untyped-def]
            got.append(message)
            if len(got) == 2:
                two.set()

        tag = await consumers.start("t", 2, deliver, lambda: None)
        await asyncio.wait_for(two.wait(), 5)
        assert len(got) == 2  # the prefetch
        await got[0].ack()
        await consumers.stop(tag)
        passed_on = len(got)
        # A message the quorum queue gave the consumer but had not sent when the cancel
        # came goes back to the queue (as a delivery: x-delivery-count + 1); nothing is
        # delivered after the cancel, nor left unacked unseen.
        end = asyncio.get_running_loop().time() + 2
        while (await counts(channel, name))[0] != 3 - passed_on:
            assert asyncio.get_running_loop().time() < end, "a message was delivered unseen"
            await asyncio.sleep(0.02)
        assert len(got) == passed_on
        for message in got[1:]:
            await message.ack()
        await (await channel.get_underlay_channel()).queue_purge(name)


async def test_a_consumer_the_broker_cancels_ends_its_lease(
    quorum_queue: tuple[AbstractChannel, str], notices: Notices, amqp_url: str
) -> None:
    channel, name = quorum_queue
    consumers = QueueConsumers(channel, {"t": name}, notices)
    lost = asyncio.Event()
    tag = await consumers.start("t", 2, lambda message: None, lost.set)
    operator = await aio_pika.connect(amqp_url)
    async with operator:  # deleting the queue cancels its consumers
        await (await operator.channel()).queue_delete(name, if_unused=False, if_empty=False)
    await asyncio.wait_for(lost.wait(), 5)
    await consumers.stop(tag)  # nothing left to cancel: no error


async def test_a_consumer_whose_channel_closes_ends_its_lease(
    quorum_queue: tuple[AbstractChannel, str], notices: Notices
) -> None:
    channel, name = quorum_queue
    consumers = QueueConsumers(channel, {"t": name}, notices)
    lost = asyncio.Event()
    tag = await consumers.start("t", 2, lambda message: None, lost.set)
    await (await channel.get_underlay_channel()).close()
    await asyncio.wait_for(lost.wait(), 5)
    await consumers.stop(tag)


async def test_a_lease_mutes_the_notices_of_its_queue_until_it_ends(
    connection: AbstractRobustConnection,
    quorum_queue: tuple[AbstractChannel, str],
    notices: Notices,
) -> None:
    """Its consumer gets every message there: a notice would cost the worker CPU for
    nothing. They are heard again before stop returns, i.e. before the puller looks."""
    channel, name = quorum_queue
    consumers = QueueConsumers(channel, {"t": name}, notices)
    assert await routed(connection, f"{name}.work", "t")
    tag = await consumers.start("t", 2, lambda message: None, lambda: None)
    assert not await routed(connection, f"{name}.work", "t")
    await consumers.stop(tag)
    assert await routed(connection, f"{name}.work", "t")


async def test_a_lease_whose_channel_closes_unmutes_its_notices(
    connection: AbstractRobustConnection,
    quorum_queue: tuple[AbstractChannel, str],
    notices: WatchedNotices,
) -> None:
    channel, name = quorum_queue
    consumers = QueueConsumers(channel, {"t": name}, notices)
    lost = asyncio.Event()
    await consumers.start("t", 2, lambda message: None, lost.set)
    assert not await routed(connection, f"{name}.work", "t")
    notices.heard.clear()
    await (await channel.get_underlay_channel()).close()
    await asyncio.wait_for(lost.wait(), 5)
    await asyncio.wait_for(notices.heard.wait(), 5)  # bound again in the background
    assert await routed(connection, f"{name}.work", "t")
