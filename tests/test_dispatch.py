"""The puller of a worker of several task types: never more messages in hand than free
slots, a round robin over the queues, notices and polls that find new messages."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import pytest

from compute.dispatch import Credit, Puller

pytestmark = pytest.mark.timeout(10)


@dataclass
class FakeMessage:
    task: str
    body: int
    message_count: int


class Queues:
    """In-memory task queues answering like basic.get: a message and how many are left."""

    def __init__(self, **contents: list[int]) -> None:
        self.contents = {task: collections.deque(items) for task, items in contents.items()}
        self.gets = 0
        self.asked: list[str] = []
        self.fail_next = 0

    async def get(self, task: str) -> FakeMessage | None:
        self.gets += 1
        self.asked.append(task)
        await asyncio.sleep(0)  # a round trip: other tasks may run meanwhile
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("channel closed")
        queue = self.contents[task]
        if not queue:
            return None
        return FakeMessage(task, queue.popleft(), len(queue))


class Taken:
    def __init__(self) -> None:
        self.items: asyncio.Queue[tuple[str, int, Credit]] = asyncio.Queue()

    def handoff(self, task: str, message: FakeMessage, credit: Credit) -> None:
        self.items.put_nowait((task, message.body, credit))

    async def next(self) -> tuple[str, int, Credit]:
        return await asyncio.wait_for(self.items.get(), 2)


async def settle() -> None:
    """Lets every ready task run until all wait on something."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def running():
    tasks: list[asyncio.Task[None]] = []

    def start(puller: Puller, taken: Taken) -> None:
        tasks.append(asyncio.create_task(puller.run(taken.handoff)))  # type: ignore[arg-type]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_never_more_messages_in_hand_than_free_slots(running) -> None:
    queues = Queues(a=[1, 2, 3], b=[4, 5, 6])
    taken = Taken()
    running(Puller(["a", "b"], queues.get, slots=2, poll_interval=60), taken)
    first, second = await taken.next(), await taken.next()
    await settle()
    assert taken.items.empty()
    assert queues.gets == 2  # no get while both slots are lent out
    first[2].release()
    first[2].release()  # a second release of the same credit gives nothing back
    third = await taken.next()
    await settle()
    assert taken.items.empty()
    assert {first[1], second[1], third[1]} == {1, 4, 2}


async def test_the_queues_take_turns(running) -> None:
    queues = Queues(a=[1, 2, 3], b=[4, 5, 6], c=[])
    taken = Taken()
    running(Puller(["a", "b", "c"], queues.get, slots=10, poll_interval=60), taken)
    order = [(await taken.next())[0] for _ in range(6)]
    assert order == ["a", "b", "a", "b", "a", "b"]


async def test_a_notice_wakes_an_idle_puller_at_once(running) -> None:
    queues = Queues(a=[], b=[])
    taken = Taken()
    puller = Puller(["a", "b"], queues.get, slots=1, poll_interval=60)
    running(puller, taken)
    await settle()
    idle_gets = queues.gets
    queues.contents["b"].append(7)
    puller.notice("b")
    assert (await taken.next())[:2] == ("b", 7)
    assert queues.gets == idle_gets + 1  # only the announced queue was asked


async def test_a_notice_during_an_empty_get_is_not_lost(running) -> None:
    queues = Queues(a=[])
    puller = Puller(["a"], queues.get, slots=1, poll_interval=60)
    real_get = queues.get

    async def get_racing_a_publish(task: str) -> FakeMessage | None:
        message = await real_get(task)  # the queue was empty when looked at...
        if queues.gets == 2:
            queues.contents["a"].append(9)  # ...and the next message arrives meanwhile
            puller.notice("a")
        return message

    puller._get = get_racing_a_publish  # type: ignore[assignment]
    taken = Taken()
    running(puller, taken)
    await settle()
    assert queues.gets == 1  # the first sweep found nothing
    puller.notice("a")  # the second get, empty, races a publish and its notice
    assert (await taken.next())[:2] == ("a", 9)


async def test_the_poll_finds_messages_nobody_announced(running) -> None:
    queues = Queues(a=[], b=[])
    taken = Taken()
    running(Puller(["a", "b"], queues.get, slots=1, poll_interval=0.05), taken)
    await settle()
    queues.contents["a"].append(3)  # a redelivery: no gateway announces it
    assert (await taken.next())[:2] == ("a", 3)


async def test_a_poll_asks_the_announced_queue_first(running) -> None:
    now = [0.0]
    queues = Queues(a=[], b=[], c=[])
    puller = Puller(["a", "b", "c"], queues.get, slots=1, poll_interval=1.0, clock=lambda: now[0])
    taken = Taken()
    running(puller, taken)
    await settle()
    assert queues.asked == ["a", "b", "c"]  # the first poll
    now[0] = 5.0  # a poll is due when the next notice comes
    queues.contents["c"].append(1)
    puller.notice("c")
    assert (await taken.next())[:2] == ("c", 1)
    assert queues.asked[3:] == ["c"]


async def test_a_failing_get_is_retried(running) -> None:
    queues = Queues(a=[1])
    queues.fail_next = 2
    taken = Taken()
    running(Puller(["a"], queues.get, slots=1, poll_interval=60), taken)
    assert (await taken.next())[:2] == ("a", 1)
    assert queues.gets == 3
