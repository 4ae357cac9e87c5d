"""The clients this gateway holds, told to every worker.

A task tied to its client (an RPC, a stream) is held by the worker that has it to a
grace after the last word of its client (compute/presence.py). This gateway gives that
word on the control exchange: every half grace, the tied tasks a client follows here
(an RPC that waits, an event stream that is open), an empty list too, and within 0.1 s
of a client starting to follow one. A client that leaves is no longer listed; one that
comes back, here or elsewhere, is listed there. A task answered `202` is untied: it is
listed as released until it ends."""

from __future__ import annotations

import asyncio
import logging

from contracts.messages import Presence
from gateway.broker import Broker
from gateway.tasktable import Record
from runtime.background import Background

log = logging.getLogger("timebox.gateway.clients")

TELL_WITHIN = 0.1  # seconds


class Clients:
    def __init__(self, broker: Broker, grace: float) -> None:
        self.broker = broker
        self.grace = grace
        self._here: dict[Record, int] = {}  # tied tasks: the clients following each here
        self._released: set[Record] = set()  # tied tasks answered `202` here
        self._telling = False
        self._sending = Background()

    @property
    def followed(self) -> int:
        """Tied tasks a client follows here now."""
        return len(self._here)

    def start(self) -> None:
        self._sending.spawn(self._keep_telling())

    async def close(self) -> None:
        await self._sending.cancel()
        if self._released:  # a stopping gateway's RPCs, answered `202`: they run on
            await self._tell()

    def follow(self, record: Record) -> None:
        """A client starts following `record`'s task here: an RPC waits, an event
        stream opens."""
        if record.tied and not record.status.state.terminal:
            self._here[record] = self._here.get(record, 0) + 1
            if self._here[record] == 1:
                self._tell_soon()

    def unfollow(self, record: Record) -> None:
        """The client stops following it here (it ended, or the client left)."""
        if record in self._here:
            self._here[record] -= 1
            if not self._here[record]:
                del self._here[record]

    async def release(self, record: Record) -> None:
        """The task runs on without its client (answered `202`): untied, and told so
        before its client hears of it (then with every word until it ends)."""
        if record.tied and not record.status.state.terminal:
            self._released.add(record)
            await self._tell()

    def _tell_soon(self) -> None:
        if not self._telling:
            self._telling = True
            self._sending.spawn(self._tell_in(TELL_WITHIN))

    async def _tell_in(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._telling = False
        await self._tell()

    async def _keep_telling(self) -> None:
        while True:
            await asyncio.sleep(max(self.grace / 2, TELL_WITHIN))
            await self._tell()

    async def _tell(self) -> None:
        self._released = {r for r in self._released if not r.status.state.terminal}
        presence = Presence(
            gateway=self.broker.name,
            grace=self.grace,
            tasks=[r.status.id for r in self._here if not r.status.state.terminal],
            released={r.status.id: r.deadline.epoch_ms for r in self._released if r.deadline},
        )
        try:
            await self.broker.publish_presence(presence)
        except Exception as exc:  # the next one, half a grace later, may get through
            log.debug("presence not told: %r", exc)
