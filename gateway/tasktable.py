"""The gateway's view of recent tasks, folded from the event stream.

Every gateway reads the whole stream, so any replica answers for any task. The
table is bounded: the oldest tasks are forgotten first."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from contracts.events import TaskEvent, TaskStatus


class SubscriberTooSlow(Exception):
    """The subscriber's buffer filled up: it is cut off so it slows nobody else."""


class SubscriptionClosed(Exception):
    """The gateway is shutting down: the stream ends, and the client reconnects."""


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[tuple[int, TaskEvent] | None]
    overflowed: bool = False
    closed: bool = False

    def push(self, item: tuple[int, TaskEvent]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True

    @property
    def waiting(self) -> bool:
        """Whether events wait to be taken."""
        return not self.queue.empty()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    async def get(self) -> tuple[int, TaskEvent]:
        if self.queue.empty():
            if self.closed:
                raise SubscriptionClosed()
            if self.overflowed:
                raise SubscriberTooSlow()
        item = await self.queue.get()
        if item is None:
            raise SubscriptionClosed()
        return item


@dataclass(eq=False)
class Record:
    status: TaskStatus
    owner: str | None = None
    cost: float | None = None
    local: bool = False  # submitted through this gateway
    idempotency_key: str | None = None
    _frames: dict[int, bytes] = field(default_factory=dict, repr=False)
    refused: bool = False  # the broker refused it: the 503 told the client so
    events: list[tuple[int, TaskEvent]] = field(default_factory=list)
    subscribers: set[Subscriber] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def encoded(self, offset: int, event: TaskEvent) -> bytes:
        """The SSE frame of one event, encoded once for all its subscribers."""
        frame = self._frames.get(offset)
        if frame is None:
            frame = sse_frame(offset, event)
            self._frames[offset] = frame
        return frame

    @property
    def terminal_offset(self) -> int | None:
        if self.events and self.events[-1][1].terminal:
            return self.events[-1][0]
        return None

    def subscribe(self, buffer: int) -> Subscriber:
        sub = Subscriber(asyncio.Queue(maxsize=buffer))
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)


def sse_frame(offset: int, event: TaskEvent) -> bytes:
    data = event.model_dump_json(exclude_none=True)
    return f"id: {offset}\r\nevent: {event.type.value}\r\ndata: {data}\r\n\r\n".encode()


class TaskTable:
    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, Record] = OrderedDict()
        self.last_offset = -1
        self.listeners: list[Callable[[Record, TaskEvent], None]] = []
        self._idempotent: dict[tuple[str | None, str], str] = {}
        self._arrivals: dict[str, list[asyncio.Future[Record]]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, task_id: str) -> Record | None:
        return self._tasks.get(task_id)

    async def arrival(self, task_id: str, patience: float) -> Record | None:
        """The task's record, waiting up to `patience` seconds for its first event to be
        read: a task just submitted through another gateway is known here a moment later."""
        record = self._tasks.get(task_id)
        if record is not None or patience <= 0:
            return record
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._arrivals.setdefault(task_id, []).append(future)
        try:
            return await asyncio.wait_for(future, patience)
        except TimeoutError:
            return None
        finally:
            waiting = self._arrivals.get(task_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._arrivals.pop(task_id, None)

    def by_idempotency_key(self, owner: str | None, key: str) -> Record | None:
        task_id = self._idempotent.get((owner, key))
        return None if task_id is None else self._tasks.get(task_id)

    def expect(self, queued: TaskEvent) -> Record:
        """Records a task this gateway just queued, before its event comes back from the
        stream, so that the submitter's next request finds it."""
        known = self._tasks.get(queued.task_id)
        record = known or self._insert(queued)
        record.local = True
        if known is None:
            # now, not when the event comes back: admission judges a burst of submissions
            # on all of them, not on those the stream has delivered so far
            self._tell(record, queued)
        return record

    def apply(self, offset: int, event: TaskEvent) -> None:
        """Folds in one event read from the stream at `offset` (each offset once)."""
        if offset <= self.last_offset:
            return
        self.last_offset = offset
        record = self._tasks.get(event.task_id)
        if record is None:
            record = self._insert(event)
        elif not record.status.apply(event):
            return  # after the terminal event: a late duplicate, ignored everywhere
        record.events.append((offset, event))
        for sub in record.subscribers:
            sub.push((offset, event))
        if event.terminal:
            record.done.set()
        self._tell(record, event)

    def _tell(self, record: Record, event: TaskEvent) -> None:
        for listener in self.listeners:
            listener(record, event)

    def close_subscriptions(self) -> int:
        closed = 0
        for record in self._tasks.values():
            for sub in record.subscribers:
                sub.close()
                closed += 1
        return closed

    def _insert(self, event: TaskEvent) -> Record:
        record = Record(TaskStatus.first(event), owner=event.owner, cost=event.cost)
        self._tasks[event.task_id] = record
        for future in self._arrivals.pop(event.task_id, []):
            if not future.done():
                future.set_result(record)
        if event.idempotency_key is not None:
            record.idempotency_key = event.idempotency_key
            self._idempotent[(event.owner, event.idempotency_key)] = event.task_id
        while len(self._tasks) > self.max_tasks:
            _, old = self._tasks.popitem(last=False)
            if old.idempotency_key is not None:
                self._idempotent.pop((old.owner, old.idempotency_key), None)
        if event.terminal:
            record.done.set()
        return record
