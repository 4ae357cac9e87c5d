"""The connection both sides open: frames of one loop turn go out in one write, in order."""

import asyncio
import logging
import uuid

import aio_pika
import pytest
from aiormq.exceptions import ChannelInvalidStateError, DeliveryError

from contracts.events import EventType, TaskEvent
from contracts.messages import CONTENT_TYPE, EVENT_TYPE
from runtime.amqp import CoalescingWriter, connect, publish_event

pytestmark = pytest.mark.timeout(30)


class Recording(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def writer() -> tuple[CoalescingWriter, Recording]:
    loop = asyncio.get_running_loop()
    transport = Recording()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    return CoalescingWriter(transport, protocol, reader, loop), transport


async def test_the_writes_of_one_turn_reach_the_transport_as_one_in_order() -> None:
    w, transport = writer()
    for frame in (b"a", b"bc", b"d"):
        w.write(frame)
        await w.drain()  # as aiormq does after each publish: it must not flush
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"abcd"]
    w.write(b"e")
    await asyncio.sleep(0)
    assert transport.writes == [b"abcd", b"e"]
    w.close()


async def test_close_sends_what_is_pending_first() -> None:
    w, transport = writer()
    w.write(b"close frame")
    w.close()
    assert transport.writes == [b"close frame"]
    assert transport.closed


async def test_many_publishes_in_one_turn_arrive_whole_and_in_order(amqp_url: str) -> None:
    connection = await connect(
        amqp_url, "test", heartbeat=10, reconnect_interval=1, log=logging.getLogger("test")
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"tbtest-amqp-{uuid.uuid4().hex[:8]}", exclusive=True)
        bodies = [f"{i}".encode() * (1 + i % 300) for i in range(500)]
        await asyncio.gather(
            *(channel.default_exchange.publish(aio_pika.Message(b), queue.name) for b in bodies)
        )
        got: list[bytes] = []
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                got.append(message.body)
                if len(got) == len(bodies):
                    break
        assert got == bodies


async def test_an_event_goes_out_confirmed_with_its_properties_and_a_refusal_raises(
    amqp_url: str,
) -> None:
    connection = await connect(
        amqp_url, "test", heartbeat=10, reconnect_interval=1, log=logging.getLogger("test")
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        name = f"tbtest-amqp-{uuid.uuid4().hex[:8]}"
        queue = await channel.declare_queue(name, exclusive=True)
        event = TaskEvent(type=EventType.RUNNING, task_id="t1", task="echo", worker="w")
        await publish_event(channel, queue.name, event, confirm_within=5)
        message = await queue.get(timeout=5)
        assert TaskEvent.model_validate_json(message.body) == event
        assert (message.content_type, message.type) == (CONTENT_TYPE, EVENT_TYPE)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

        full = await channel.declare_queue(
            f"{name}-full",
            exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        with pytest.raises(DeliveryError):  # the broker's nack
            await publish_event(channel, full.name, event, confirm_within=5)

        await channel.close()
        with pytest.raises(ChannelInvalidStateError):  # at once, not at the timeout
            await asyncio.wait_for(
                publish_event(channel, queue.name, event, confirm_within=60), timeout=2
            )
