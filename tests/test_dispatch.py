"""The puller of a worker of several task types: never more messages in hand than free
slots, a round robin over the queues, notices and polls that find new messages, and
leases of every slot to a consumer while only one queue has work."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from compute.dispatch import Credit, Puller

pytestmark = pytest.mark.timeout(10)


@dataclass
class FakeMessage:
    task: str
    body: int
    message_count: int
    on_ack: Callable[[], None] | None = None

    def ack(self) -> None:
        if self.on_ack is not None:
            self.on_ack()


class Queues:
    """In-memory task queues answering like basic.get: a message and how many are left."""

    def __init__(self, **contents: list[int]) -> None:
        self.contents = {task: collections.deque(items) for task, items in contents.items()}
        self.gets = 0
        self.counted: asyncio.Queue[str] = asyncio.Queue()
        self.asked: list[str] = []
        self.fail_next = 0

    async def count(self, task: str) -> int:
        """A passive declare's message count: touches no message."""
        self.counted.put_nowait(task)
        self.asked.append(f"count {task}")
        await asyncio.sleep(0)
        return len(self.contents[task])

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


@dataclass(eq=False)
class Consumer:
    task: str
    prefetch: int
    deliver: Callable[[FakeMessage], None]
    lost: Callable[[], None]
    unacked: int = 0


@dataclass
class FakeConsumers:
    """Consumers as the broker runs them: at most `prefetch` unacked messages each."""

    queues: Queues
    active: dict[str, Consumer] = field(default_factory=dict)
    started: list[tuple[str, int]] = field(default_factory=list)
    stopped: int = 0

    async def start(self, task, prefetch, deliver, lost) -> str:  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)  # consume-ok
        tag = f"ctag{len(self.started)}"
        self.started.append((task, prefetch))
        self.active[tag] = Consumer(task, prefetch, deliver, lost)
        self.pump()
        return tag

    def pump(self) -> None:
        """Delivers what the queues hold to the consumers with room for it."""
        for consumer in list(self.active.values()):
            queue = self.queues.contents[consumer.task]
            while queue and consumer.unacked < consumer.prefetch:
                consumer.unacked += 1
                ack = lambda c=consumer: self._ack(c)  # noqa: E731
                consumer.deliver(FakeMessage(consumer.task, queue.popleft(), len(queue), ack))

    def _ack(self, consumer: Consumer) -> None:
        consumer.unacked -= 1
        self.pump()

    async def stop(self, tag: str) -> None:
        await asyncio.sleep(0)  # cancel-ok
        del self.active[tag]
        self.stopped += 1

    def lose(self, tag: str) -> None:
        """The channel went: the consumer is gone, its unacked messages go back."""
        self.active.pop(tag).lost()


class Taken:
    def __init__(self, slots: int = 1_000) -> None:
        self.items: asyncio.Queue[tuple[str, int, Credit, FakeMessage]] = asyncio.Queue()
        self.slots = slots
        self.in_hand = 0  # handed over and not released: never above the slots
        self.most_in_hand = 0

    def handoff(self, task: str, message: FakeMessage, credit: Credit) -> None:
        self.in_hand += 1
        self.most_in_hand = max(self.most_in_hand, self.in_hand)
        assert self.in_hand <= self.slots, "more messages in hand than slots"
        self.items.put_nowait((task, message.body, Tracked(credit, self), message))

    async def next(self) -> tuple[str, int, Credit, FakeMessage]:
        return await asyncio.wait_for(self.items.get(), 2)

    def done(self, item: tuple[str, int, Credit, FakeMessage]) -> None:
        """The task ended: its slot is free, then its message is acked."""
        item[2].release()
        item[3].ack()


class Tracked(Credit):
    def __init__(self, credit: Credit, taken: Taken) -> None:
        def give_back() -> None:
            taken.in_hand -= 1
            credit.release()

        super().__init__(give_back)


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
    running(Puller(["a", "b"], queues.get, slots=2, poll_interval=60, count=queues.count), taken)
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
    running(
        Puller(["a", "b", "c"], queues.get, slots=10, poll_interval=60, count=queues.count), taken
    )
    order = [(await taken.next())[0] for _ in range(6)]
    assert order == ["a", "b", "a", "b", "a", "b"]


async def test_a_notice_wakes_an_idle_puller_at_once(running) -> None:
    queues = Queues(a=[], b=[])
    taken = Taken()
    puller = Puller(["a", "b"], queues.get, slots=1, poll_interval=60, count=queues.count)
    running(puller, taken)
    await settle()
    idle_gets = queues.gets
    queues.contents["b"].append(7)
    puller.notice("b")
    assert (await taken.next())[:2] == ("b", 7)
    assert queues.gets == idle_gets + 1  # only the announced queue was asked


async def test_a_notice_during_an_empty_get_is_not_lost(running) -> None:
    queues = Queues(a=[])
    puller = Puller(["a"], queues.get, slots=1, poll_interval=60, count=queues.count)
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
    running(Puller(["a", "b"], queues.get, slots=1, poll_interval=0.05, count=queues.count), taken)
    await settle()
    queues.contents["a"].append(3)  # a redelivery: no gateway announces it
    assert (await taken.next())[:2] == ("a", 3)


async def test_a_poll_gets_only_from_a_queue_that_holds_messages(running) -> None:
    """On a quorum queue every basic.get, an empty one too, is written to its Raft log:
    an idle worker's poll asks for counts instead, and gets only where there is work."""
    queues = Queues(a=[], b=[], c=[])
    taken = Taken()
    running(
        Puller(["a", "b", "c"], queues.get, slots=1, poll_interval=0.05, count=queues.count),
        taken,
    )
    for _ in range(6):  # two polls of the three queues
        await asyncio.wait_for(queues.counted.get(), 2)
    assert queues.gets == 3  # at start, when every queue may hold work; none since
    queues.contents["b"].append(5)  # a redelivery: nobody announces it
    assert (await taken.next())[:2] == ("b", 5)
    assert queues.asked[-2:] == ["count b", "b"]


async def test_a_poll_asks_the_announced_queue_first(running) -> None:
    now = [0.0]
    queues = Queues(a=[], b=[], c=[])
    puller = Puller(
        ["a", "b", "c"],
        queues.get,
        slots=1,
        poll_interval=1.0,
        count=queues.count,
        clock=lambda: now[0],
    )
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
    running(Puller(["a"], queues.get, slots=1, poll_interval=60, count=queues.count), taken)
    assert (await taken.next())[:2] == ("a", 1)
    assert queues.gets == 3


def leasing(slots: int, poll_interval: float = 60, **contents: list[int]):  # type: ignore[no-untyped-def]
    queues = Queues(**contents)
    consumers = FakeConsumers(queues)
    puller = Puller(
        list(contents),
        queues.get,
        slots=slots,
        poll_interval=poll_interval,
        count=queues.count,
        consumers=consumers,
    )
    return queues, consumers, puller, Taken(slots)


def publish(queues: Queues, consumers: FakeConsumers, puller: Puller, task: str, *bodies: int):  # type: ignore[no-untyped-def]
    queues.contents[task].extend(bodies)
    consumers.pump()
    puller.notice(task)


async def test_an_idle_puller_lends_every_slot_to_the_only_queue_with_work(running) -> None:
    queues, consumers, puller, taken = leasing(2, a=[], b=[])
    running(puller, taken)
    await settle()
    gets = queues.gets  # the first sweep: both empty
    publish(queues, consumers, puller, "a", 1, 2, 3)
    first, second = await taken.next(), await taken.next()
    await settle()
    assert consumers.started == [("a", 2)]
    assert taken.items.empty()  # the prefetch is the slots lent
    taken.done(first)
    third = await taken.next()
    assert [first[1], second[1], third[1]] == [1, 2, 3]
    publish(queues, consumers, puller, "a", 4)  # a notice for the leased queue changes nothing
    await settle()
    taken.done(second)
    assert (await taken.next())[1] == 4
    assert queues.gets == gets  # no get: the consumer brought every message
    assert consumers.stopped == 0


async def test_work_that_alternates_between_queues_is_pulled_without_leases(running) -> None:
    """A lease for one message costs a consumer started and cancelled, and its queue's
    notices unbound and bound again: for nothing."""
    queues, consumers, puller, taken = leasing(2, a=[], b=[])
    running(puller, taken)
    await settle()
    for task, body in [("a", 1), ("b", 2), ("a", 3), ("b", 4), ("a", 5)]:
        publish(queues, consumers, puller, task, body)
        item = await taken.next()
        assert item[:2] == (task, body)
        taken.done(item)
        await settle()
    assert consumers.started == [("a", 2)]  # the first: nothing else was announced yet
    assert consumers.stopped == 1


async def test_a_second_notice_in_a_row_for_one_queue_starts_a_lease(running) -> None:
    queues, consumers, puller, taken = leasing(2, a=[], b=[])
    running(puller, taken)
    await settle()
    for task, body in [("b", 1), ("a", 2)]:
        publish(queues, consumers, puller, task, body)
        taken.done(await taken.next())
        await settle()
    started = list(consumers.started)
    gets = queues.gets
    publish(queues, consumers, puller, "a", 3)
    assert (await taken.next())[:2] == ("a", 3)
    assert consumers.started == [*started, ("a", 2)]
    assert queues.gets == gets  # the consumer brought it


async def test_notices_for_one_queue_while_every_slot_is_busy_lead_to_a_lease(running) -> None:
    queues, consumers, puller, taken = leasing(1, a=[], b=[])
    running(puller, taken)
    await settle()
    puller.notice("a")  # a notice for a (empty), then b's: b's message is pulled
    publish(queues, consumers, puller, "b", 1)
    first = await taken.next()
    assert first[:2] == ("b", 1)
    for body in (2, 3, 4):  # the slot is busy
        publish(queues, consumers, puller, "a", body)
    await settle()
    taken.done(first)
    assert (await taken.next())[:2] == ("a", 2)
    assert consumers.started == [("a", 1)]


async def test_work_in_another_queue_ends_the_lease_and_its_free_slots_come_back(
    running,
) -> None:
    queues, consumers, puller, taken = leasing(2, a=[], b=[])
    running(puller, taken)
    await settle()
    publish(queues, consumers, puller, "a", 1)
    first = await taken.next()
    publish(queues, consumers, puller, "b", 7, 8)
    assert (await taken.next())[:2] == ("b", 7)  # the lease's unused slot, by a get
    assert consumers.stopped == 1
    await settle()
    assert taken.items.empty()  # the other slot still runs a's task
    publish(queues, consumers, puller, "a", 2)
    taken.done(first)
    rest = {(await taken.next())[:2]}
    assert rest <= {("b", 8), ("a", 2)}
    assert consumers.started == [("a", 2)]  # no new lease while a slot is busy


async def test_the_poll_ends_a_lease_when_another_queue_has_unannounced_work(running) -> None:
    queues, consumers, puller, taken = leasing(1, poll_interval=0.05, a=[], b=[])
    running(puller, taken)
    await settle()
    publish(queues, consumers, puller, "a", 1)
    taken.done(await taken.next())
    queues.contents["b"].append(5)  # a redelivery: nobody announces it
    assert (await taken.next())[:2] == ("b", 5)
    assert consumers.stopped == 1


async def test_a_lease_whose_consumer_is_lost_gives_back_its_free_slots(running) -> None:
    queues, consumers, puller, taken = leasing(2, a=[], b=[])
    running(puller, taken)
    await settle()
    publish(queues, consumers, puller, "a", 1)
    first = await taken.next()
    [tag] = consumers.active
    consumers.lose(tag)
    queues.contents["a"].append(2)
    assert (await taken.next())[:2] == ("a", 2)  # the free slot pulls again
    await settle()
    assert taken.items.empty()
    taken.done(first)
    await settle()
    assert puller.in_hand == 1


@pytest.mark.parametrize("seed", range(20))
async def test_leases_and_pulls_never_hold_more_than_the_slots(running, seed: int) -> None:
    """Random publishes, notices, polls, task ends and lost consumers."""
    rng = random.Random(seed)
    queues, consumers, puller, taken = leasing(3, poll_interval=0.01, a=[], b=[], c=[])
    running(puller, taken)
    held: list[tuple[str, int, Credit, FakeMessage]] = []
    body = 0
    for _ in range(300):
        action = rng.random()
        if action < 0.4:
            body += 1
            task = rng.choice("abc")
            if rng.random() < 0.8:
                publish(queues, consumers, puller, task, body)
            else:
                queues.contents[task].append(body)  # unannounced
                consumers.pump()
        elif action < 0.8 and held:
            taken.done(held.pop(rng.randrange(len(held))))
        elif action < 0.85 and consumers.active:
            consumers.lose(rng.choice(list(consumers.active)))
        await settle()
        while not taken.items.empty():
            held.append(taken.items.get_nowait())
        assert puller.in_hand == len(held) == taken.in_hand <= 3
    while True:  # everything is taken in the end
        for item in held:
            taken.done(item)
        held.clear()
        await settle()
        while not taken.items.empty():
            held.append(taken.items.get_nowait())
        if not held and not any(queues.contents.values()):
            break
        if not held:
            held.append(await taken.next())  # found by a poll
    assert taken.most_in_hand <= 3


@pytest.mark.parametrize("lease", [False, True], ids=["pulling", "leasing"])
async def test_a_cancel_that_meets_a_wake_up_still_stops_the_puller(lease: bool) -> None:
    """A worker's shutdown cancels its puller; a notice or a slot given back in the same
    loop turn must not swallow that cancel (asyncio.wait_for on Python 3.11 returns the
    inner result instead of raising when both happen at once)."""
    if lease:
        queues, consumers, puller, taken = leasing(1, a=[], b=[])
    else:
        queues, puller, taken = Queues(a=[], b=[]), None, Taken()
        puller = Puller(["a", "b"], queues.get, slots=1, poll_interval=60, count=queues.count)
    task = asyncio.create_task(puller.run(taken.handoff))  # type: ignore[arg-type]
    await settle()
    if lease:
        publish(queues, consumers, puller, "a", 1)
        await taken.next()
        await settle()
        assert puller.lease is not None
    puller.notice("b")  # the idle puller's wait is over in this turn...
    task.cancel()  # ...and so is its run
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_close_stops_a_puller_whose_cancel_a_get_swallowed() -> None:
    """aiormq times its calls with asyncio.wait_for, which on Python 3.11 returns a reply
    that arrives in the same loop turn as a cancel instead of raising the cancel."""
    replies: asyncio.Queue[asyncio.Future[FakeMessage | None]] = asyncio.Queue()

    async def get(task: str) -> FakeMessage | None:
        reply: asyncio.Future[FakeMessage | None] = asyncio.get_running_loop().create_future()
        replies.put_nowait(reply)
        try:
            return await reply
        except asyncio.CancelledError:
            if not reply.done():
                raise
            return reply.result()  # as asyncio.wait_for does on 3.11: the reply wins

    taken = Taken()
    puller = Puller(["a", "b"], get, slots=1, poll_interval=60, count=Queues(a=[], b=[]).count)
    task = asyncio.create_task(puller.run(taken.handoff))  # type: ignore[arg-type]
    reply = await asyncio.wait_for(replies.get(), 2)
    reply.set_result(FakeMessage("a", 1, 0))
    puller.close()
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    assert task.done()
    assert (await taken.next())[:2] == ("a", 1)  # handed over: the worker hands it back
