"""Which tasks have a client following them, across gateways.

A task submitted as an event stream (a POST with `Accept: text/event-stream`), or
waited for by an RPC with an Idempotency-Key, is its client's: once no client follows
it for `stream_grace` seconds it is cancelled as abandoned. Behind a load balancer the
client may come back to another gateway (to the task's events with `Last-Event-ID`, or
with the same key), and may leave that one too. So every gateway says which such tasks
it serves on `{ns}.gateways` (each gateway has its own queue bound there): at once when
a client starts following a task there, and again every half grace while one does. A
gateway whose client left cancels the task only after a whole grace in which no client
followed it there and no other gateway said it serves it.

A gateway that crashes says nothing more: its clients lose their connections, and
may come back elsewhere or not. So every gateway also looks after the streamed tasks
it knows (`orphans`): one that no client has followed, here or (by the notices) on any
other gateway, for two graces is cancelled as orphaned. Two graces: a gateway whose
own client left decides after one, and a live one's notices, one every half grace,
must all be lost for a task it serves to be cancelled.

An RPC's task is its client's too, and a client cut off by its gateway's crash cannot
come back without an Idempotency-Key (it does not know the task's id). Each notice
also lists the RPCs waiting on that gateway (`awaited`), and those it stopped waiting
for while they run on (`released`: a `Prefer: wait=N` bound passed, or the gateway is
stopping, and the client got a `202`), repeated for two graces. A new wait or release
is told within `TELL_WITHIN` (one notice for all those of that moment, and none if the
waits have all ended), not at the next renewal: a gateway killed by a burst of requests
dies soon after they came. A gateway that heard that an RPC was awaited, and has heard
nothing of it since for two graces (and was listening all along), cancels it as
orphaned. Without word of it, an RPC is never cancelled: a task whose gateway crashed
within that tenth of a second, or with no other gateway alive, runs on to its end.

Listening means more than being connected: a gateway sends a notice every half grace
even with nothing to say, and hears its own come back. While they do not (a memory or
disk alarm holds every publisher, the other gateways' notices too; a link to the
broker that went silent), it judges no task an orphan, and starts counting again once
they do."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from contracts.background import Background
from contracts.events import EventType, TaskEvent
from contracts.messages import WatchNotice
from gateway.broker import Broker
from gateway.tasktable import Record, TaskTable

log = logging.getLogger("timebox.gateway.watches")

TELL_WITHIN = 0.1  # seconds


class Watches:
    def __init__(self, broker: Broker, table: TaskTable, grace: float) -> None:
        self.broker = broker
        self.table = table
        self.grace = grace
        self._sending = Background()
        self._followed: set[Record] = set()  # tasks a client may abandon, followed here
        self.renew_every = max(grace / 2, 0.1) if grace > 0 else 1.0
        self.orphaned_after = 4 * self.renew_every
        # streamed tasks that have not ended, and when a client was last seen following
        # each (time.monotonic()); filled from the event stream by `observe`
        self._streamed: dict[Record, float] = {}
        # RPCs waited for here (whose waits the notices list), those no longer waited
        # for while they run on (task id: when), and those that other gateways said
        # they wait for (when last said)
        self._awaited: set[Record] = set()
        self._released: dict[str, float] = {}
        self._awaited_elsewhere: dict[Record, float] = {}
        # waits begun, and whether a wait was released, since the last notice
        self._untold: set[Record] = set()
        self._untold_release = False
        self._telling = False
        self._listening_since: float | None = None
        self._heard_self = -math.inf  # when its own last notice came back
        self._deaf_said = False

    @property
    def tied(self) -> tuple[int, int]:
        """How many streamed tasks, and RPCs awaited elsewhere, are looked after."""
        return len(self._streamed), len(self._awaited_elsewhere)

    def observe(self, record: Record, event: TaskEvent) -> None:
        """A table listener: every streamed task read live, or queued here."""
        if event.type is EventType.QUEUED and record.streamed:
            self._streamed.setdefault(record, time.monotonic())

    async def start(
        self,
        cancel: Callable[[Record, str], Awaitable[None]],
        listening: Callable[[], bool],
    ) -> None:
        """Starts hearing and sending notices, and sweeping orphaned tasks: `cancel`
        cancels one, while `listening` says the event stream and notices are read."""
        assert self.broker.connection is not None
        channel = await self.broker.connection.channel()
        exchange = await channel.get_exchange(self.broker.topology.gateways_exchange)
        # a name of our own, so that a reconnect re-declares the same queue
        queue = await channel.declare_queue(
            f"{exchange.name}.{self.broker.name}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)
        self._sending.spawn(self._renew())
        self._sending.spawn(self._sweep(cancel, listening))

    async def close(self) -> None:
        await self._sending.cancel()
        if self._released:  # the waits this stopping gateway answered with a `202`
            await self._send_notice()

    def await_(self, record: Record) -> None:
        """An RPC starts waiting for `record`'s task here."""
        self._awaited.add(record)
        self._released.pop(record.status.id, None)
        self._untold.add(record)
        self._tell_soon()

    def _tell_soon(self) -> None:
        if not self._telling:
            self._telling = True
            self._sending.spawn(self._tell())

    async def _tell(self) -> None:
        await asyncio.sleep(TELL_WITHIN)
        self._telling = False
        if self._untold_release or any(
            record.waiting and not record.status.state.terminal for record in self._untold
        ):
            await self._send_notice()
        else:  # the waits were all answered already (an echo takes milliseconds)
            self._untold.clear()

    def release(self, record: Record) -> None:
        """An RPC stopped waiting for `record`'s task, which runs on: its client got a
        `202`. The other gateways hear of it within `TELL_WITHIN` (in one notice with
        the others released at the same moment: a stopping gateway releases all its
        RPCs), and again with every notice for two graces."""
        if record in self._awaited and not record.status.state.terminal:
            self._released[record.status.id] = time.monotonic()
            self._untold_release = True
            self._tell_soon()
        self._awaited.discard(record)

    def follow(self, record: Record, *, tell: bool = True) -> None:
        """A client starts following `record`'s task here (its events, or an RPC's wait
        for it). Unless `tell` is False (a task just submitted here: nobody else can
        have it yet), the other gateways hear of it now, at most once per half grace."""
        if record.status.state.terminal:
            return
        if record.streamed or record.idempotency_key is not None:
            self._followed.add(record)
        now = time.monotonic()
        if tell and now - record.told_watched >= self.grace / 2:
            record.told_watched = now
            notice = WatchNotice(task_ids=[record.status.id])
            self._sending.spawn(self.broker.send_watch_notice(notice))

    def followed_elsewhere(self, record: Record) -> bool:
        """Whether another gateway said within the last grace that it serves the task."""
        return record.watched_elsewhere > time.monotonic() - self.grace

    async def _renew(self) -> None:
        """Every half grace, one notice of the tasks that a client follows here."""
        while True:
            await asyncio.sleep(self.renew_every)
            await self._send_notice()

    async def _send_notice(self) -> None:
        self._untold.clear()
        self._untold_release = False
        for tasks in (self._followed, self._awaited):
            for record in list(tasks):
                if record.status.state.terminal or not (record.subscribers or record.waiting):
                    tasks.discard(record)
        oldest = time.monotonic() - self.orphaned_after
        for task_id, at in list(self._released.items()):
            if at < oldest:
                del self._released[task_id]
        # sent even when empty: its coming back says that notices get through
        await self.broker.send_watch_notice(
            WatchNotice(
                task_ids=[record.status.id for record in self._followed],
                awaited=[record.status.id for record in self._awaited],
                released=list(self._released),
            )
        )

    async def _sweep(
        self,
        cancel: Callable[[Record, str], Awaitable[None]],
        listening: Callable[[], bool],
    ) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            for record in self.orphans(listening()):
                how = "event stream" if record.streamed else "RPC"
                await cancel(
                    record,
                    f"orphaned: no client followed its {how} through any gateway for "
                    f"{self.orphaned_after:g} s (its gateway may have stopped)",
                )

    def orphans(self, listening: bool) -> list[Record]:
        """The streamed tasks, and the RPCs awaited elsewhere, that no client has
        followed anywhere for `orphaned_after` seconds of listening for notices; those
        that ended are forgotten."""
        now = time.monotonic()
        hearing = now - self._heard_self < self.orphaned_after / 2
        if listening and not hearing and not self._deaf_said and self._heard_self > -math.inf:
            self._deaf_said = True
            log.warning(
                "its own watch notices do not come back (a broker alarm?): no task is "
                "judged orphaned until they do"
            )
        elif hearing and self._deaf_said:
            self._deaf_said = False
            log.info("its own watch notices come back again")
        if not (listening and hearing):  # notices may be missed: the wait starts again
            self._listening_since = None
            # and a `released` may be among them; not so for a gateway just started,
            # whose first notice cannot have come back by its first sweep
            if not listening or self._heard_self > -math.inf:
                self._awaited_elsewhere.clear()
            return []
        if self._listening_since is None:
            self._listening_since = now
        orphans: dict[Record, None] = {}
        for tied in (self._streamed, self._awaited_elsewhere):
            for record, followed in list(tied.items()):
                deadline = record.deadline
                if record.status.state.terminal or (deadline and deadline.expired()):
                    del tied[record]
                elif record.subscribers or record.waiting:
                    tied[record] = now
                elif record.abandon_check:
                    pass  # its client left here: that check decides, after one grace
                elif now - max(followed, record.watched_elsewhere, self._listening_since) >= (
                    self.orphaned_after
                ):
                    orphans[record] = None
        for record in orphans:
            self._streamed.pop(record, None)
            self._awaited_elsewhere.pop(record, None)
        return list(orphans)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if message.app_id == self.broker.name:
            self._heard_self = time.monotonic()  # its subscribers are counted where they are
            return
        try:
            notice = WatchNotice.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("ignored a malformed watch notice: %s", exc)
            return
        now = time.monotonic()
        for task_id in notice.task_ids:
            record = self.table.get(task_id)
            if record is not None:
                record.watched_elsewhere = now
        for task_id in notice.awaited:
            record = self.table.get(task_id)
            if record is not None and not record.status.state.terminal:
                self._awaited_elsewhere[record] = now
        for task_id in notice.released:
            record = self.table.get(task_id)
            if record is not None:
                self._awaited_elsewhere.pop(record, None)
