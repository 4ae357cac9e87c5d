"""The gateway's view of recent tasks, folded from the event stream.

Every gateway reads the whole stream, so any replica answers for any task. A starting
gateway reads the live window first (`apply`: every task whose deadline may still be
ahead) and the older history after it (`recall`): the history's tasks are older than
any in the live window, and are forgotten first when the table is full."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from contracts.deadline import Deadline
from contracts.events import EventType, TaskEvent, TaskStatus


@dataclass(slots=True, frozen=True)
class Stored:
    """One event as a task's record keeps it, read from the stream at `offset`: its SSE
    frame, encoded once for all its subscribers, and what the readers of the record ask
    of it. A TaskEvent object costs about 1.8 KiB, most of it pydantic's; this costs
    little more than the event's JSON, and a full table holds 100,000 tasks."""

    offset: int
    type: EventType
    frame: bytes
    fraction_only: bool  # a progress report without a message (gateway/sse.py)

    @classmethod
    def of(cls, offset: int, event: TaskEvent, body: bytes | None = None) -> Stored:
        """`body`: the event as read from the stream, JSON on one line (contracts/
        amqp.py writes it so) that the frame takes as it is, rather than encoding the
        event again."""
        if body is None or b"\n" in body or b"\r" in body:
            body = event.model_dump_json(exclude_none=True).encode()
        frame = b"id: %d\r\nevent: %s\r\ndata: %s\r\n\r\n" % (offset, event.type.encode(), body)
        fraction_only = event.type is EventType.PROGRESS and event.message is None
        return cls(offset, event.type, frame, fraction_only)

    @property
    def terminal(self) -> bool:
        return self.type.terminal

    def event(self) -> TaskEvent:
        data = self.frame[self.frame.index(b"\r\ndata: ") + 8 : -4]
        return TaskEvent.model_validate_json(data)


@dataclass(eq=False, slots=True)
class Record:
    status: TaskStatus
    owner: str | None = None
    deadline: Deadline | None = None
    cost: float | None = None
    local: bool = False  # submitted through this gateway
    idempotency_key: str | None = None
    input_digest: str | None = None  # of its type and input, with an idempotency key
    tied: bool = False  # an RPC's or a stream's: held to its client's presence
    refused: bool = False  # the broker refused it: the 503 told the client so
    events: list[Stored] = field(default_factory=list)
    _done: asyncio.Event | None = None  # made when first asked for: most never are

    @property
    def done(self) -> asyncio.Event:
        """Set once the task has ended."""
        if self._done is None:
            self._done = asyncio.Event()
            if self.status.state.terminal:
                self._done.set()
        return self._done

    def ended(self) -> None:
        if self._done is not None:
            self._done.set()

    @property
    def terminal_offset(self) -> int | None:
        if self.events and self.events[-1].terminal:
            return self.events[-1].offset
        return None

    def refold(self, stored: Stored, event: TaskEvent) -> None:
        """Folds in an event older than some already folded in: the status is folded
        again in stream order, where the first terminal event wins."""
        ordered = sorted(
            [(item.offset, item, item.event()) for item in self.events]
            + [(stored.offset, stored, event)],
            key=lambda item: item[0],
        )
        status = TaskStatus.first(ordered[0][2])
        kept = [ordered[0][1]]
        for _, item, folded in ordered[1:]:
            if status.apply(folded):
                kept.append(item)
        self.status, self.events = status, kept


class TaskTable:
    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, Record] = OrderedDict()
        self._history: OrderedDict[str, Record] = OrderedDict()  # older than all of _tasks
        self.last_offset = -1
        self.listeners: list[Callable[[Record, TaskEvent], None]] = []
        # (owner, key): the task that holds the key, and its `queued` event's offset
        # (infinite until it is read)
        self._idempotent: dict[tuple[str | None, str], tuple[str, float]] = {}
        self._arrivals: dict[str, list[asyncio.Future[Record]]] = {}
        # each event kept, as it is read: its live subscribers get it (gateway/sse.py)
        self.fanout: Callable[[Record, Stored], None] = lambda record, stored: None

    def __len__(self) -> int:
        return len(self._tasks) + len(self._history)

    def get(self, task_id: str) -> Record | None:
        return self._tasks.get(task_id) or self._history.get(task_id)

    async def arrival(self, task_id: str, patience: float) -> Record | None:
        """The task's record, waiting up to `patience` seconds for its first event to be
        read: a task just submitted through another gateway is known here a moment later."""
        record = self.get(task_id)
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
        holder = self._idempotent.get((owner, key))
        return None if holder is None else self.get(holder[0])

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

    def apply(self, offset: int, event: TaskEvent, body: bytes | None = None) -> None:
        """Folds in one event read from the stream at `offset` (each offset once);
        `body`, if given, is the event as read (see Stored.of)."""
        if offset <= self.last_offset:
            return
        self.last_offset = offset
        record = self.get(event.task_id)
        if record is None:
            record = self._insert(event, offset=offset)
        elif not record.status.apply(event):
            return  # after the terminal event: a late duplicate, ignored everywhere
        else:
            self._learn(record, event, offset)  # e.g. the `queued` of a task queued here
        stored = Stored.of(offset, event, body)
        record.events.append(stored)
        self.fanout(record, stored)
        if event.terminal:
            record.ended()
        self._tell(record, event)

    def recall(self, offset: int, event: TaskEvent, body: bytes | None = None) -> None:
        """Folds in one event of the history: older than the live window `apply` began
        with, read in stream order after it. Its task began before that window, so its
        deadline has passed: no listener is told (admission and metrics look at the
        present). A subscriber is sent it only if it comes after every event the task
        has; one older than some (a task whose end was in the live window) goes into
        the replay of later subscribers only."""
        record = self.get(event.task_id)
        if record is None:
            if self._room_for_history():
                stored = Stored.of(offset, event, body)
                self._insert(event, self._history, offset).events.append(stored)
            return
        if not record.events or offset > record.events[-1].offset:
            if not record.status.apply(event):
                return
            stored = Stored.of(offset, event, body)
            record.events.append(stored)
            self.fanout(record, stored)
        elif all(known.offset != offset for known in record.events):
            # a task of both: the live window has its end
            record.refold(Stored.of(offset, event, body), event)
        else:
            return
        if record.cost is None:
            record.cost = event.cost
        self._learn(record, event, offset)
        if record.status.state.terminal:
            record.ended()

    def _room_for_history(self) -> bool:
        """Makes room for one more task of the history, the oldest of it going first;
        False when the live window's tasks fill the table."""
        if len(self) < self.max_tasks:
            return True
        if not self._history:
            return False
        self._forget(self._history)
        return True

    def _tell(self, record: Record, event: TaskEvent) -> None:
        for listener in self.listeners:
            listener(record, event)

    def _insert(
        self,
        event: TaskEvent,
        into: OrderedDict[str, Record] | None = None,
        offset: int | None = None,
    ) -> Record:
        """A new task's record, from its first event read (at `offset`; None: queued
        here, not read yet), in the live window's tasks unless `into` says otherwise."""
        record = Record(TaskStatus.first(event), owner=event.owner, cost=event.cost)
        (self._tasks if into is None else into)[event.task_id] = record
        self._arrived(event.task_id, record)
        self._learn(record, event, offset)
        while len(self) > self.max_tasks:
            self._forget(self._history or self._tasks)
        return record

    def _learn(self, record: Record, event: TaskEvent, offset: int | None) -> None:
        """What only the `queued` event (read at `offset`) says of its task."""
        if event.type is not EventType.QUEUED:
            return
        if event.deadline_ms is not None:
            record.deadline = Deadline(event.deadline_ms)
        record.input_digest = event.input_digest
        record.tied = bool(event.tied)
        key = event.idempotency_key
        if key is None:
            return
        record.idempotency_key = key
        # The first task in stream order holds the key, on every gateway alike. Two made
        # with it at the same moment through two gateways (neither had read the other's
        # `queued` yet) both run, but a retry gets the same one wherever it goes.
        at = math.inf if offset is None else offset
        holder = self._idempotent.get((record.owner, key))
        if holder is not None and holder[0] == event.task_id:
            self._idempotent[(record.owner, key)] = (event.task_id, min(at, holder[1]))
        elif holder is None or at < holder[1]:
            self._idempotent[(record.owner, key)] = (event.task_id, at)

    def _arrived(self, task_id: str, record: Record) -> None:
        for future in self._arrivals.pop(task_id, []):
            if not future.done():
                future.set_result(record)

    def _forget(self, tasks: OrderedDict[str, Record]) -> None:
        """Forgets the oldest task of `tasks`."""
        _, old = tasks.popitem(last=False)
        if old.idempotency_key is not None:
            key = (old.owner, old.idempotency_key)
            holder = self._idempotent.get(key)
            if holder is not None and holder[0] == old.status.id:
                del self._idempotent[key]
