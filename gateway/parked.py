"""`{ns}.parked`: messages that could not run (undecodable, poison, dead-lettered for
a reason other than expiry), each with why. An operator lists them, replays one as a
new task with a fresh deadline, or deletes one.

AMQP reads a queue only by taking its messages: each operation takes them, unacked, on
a channel of its own, acks the one it acted on, and closes the channel, which puts the
others back. A message is acked only once what replaces it is confirmed, so a replay
that fails leaves it parked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from contracts.errors import ParkedNotFound
from contracts.messages import (
    OWNER_HEADER,
    PARK_REASON_HEADER,
    PARKED_AT_HEADER,
    PARKED_DELIVERIES_HEADER,
)
from gateway.broker import Broker

T = TypeVar("T")
PREVIEW = 500  # characters of a body shown in a listing
SCAN = 10_000  # messages looked through, at most, for one operation


class ParkedMessage(BaseModel):
    id: str
    task: str | None
    reason: str
    parked_at: datetime | None
    deliveries: int
    size: int
    preview: str


def describe(message: AbstractIncomingMessage) -> ParkedMessage:
    headers = message.headers or {}
    at, deliveries = headers.get(PARKED_AT_HEADER), headers.get(PARKED_DELIVERIES_HEADER)
    return ParkedMessage(
        id=str(message.message_id),
        task=message.type,
        reason=str(headers.get(PARK_REASON_HEADER, "unknown")),
        parked_at=datetime.fromtimestamp(at / 1000, UTC) if isinstance(at, int) else None,
        deliveries=deliveries if isinstance(deliveries, int) else 1,
        size=len(message.body),
        preview=message.body[:PREVIEW].decode(errors="replace"),
    )


def owner_of(message: AbstractIncomingMessage) -> str | None:
    owner = (message.headers or {}).get(OWNER_HEADER)
    return owner if isinstance(owner, str) else None


class Parked:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._lock = asyncio.Lock()  # this gateway's operations take turns

    async def browse(self, owner: str | None, limit: int) -> list[ParkedMessage]:
        """The parked messages `owner` may see (all with the API open), oldest first."""
        async with self._taken() as messages:
            seen = [describe(m) for m in messages if _visible(m, owner)]
        oldest = datetime.min.replace(tzinfo=UTC)
        return sorted(seen, key=lambda m: m.parked_at or oldest)[:limit]

    async def act(
        self,
        parked_id: str,
        owner: str | None,
        action: Callable[[AbstractIncomingMessage], Awaitable[T]],
    ) -> T:
        """Runs `action` on the parked message, which is removed once it has succeeded
        (kept if it raises)."""
        async with self._taken() as messages:
            for message in messages:
                if message.message_id == parked_id and _visible(message, owner):
                    result = await action(message)
                    await message.ack()
                    return result
        raise ParkedNotFound(f"no parked message {parked_id!r}")

    @contextlib.asynccontextmanager
    async def _taken(self) -> AsyncIterator[list[AbstractIncomingMessage]]:
        self.broker.require_connected()
        assert self.broker.connection is not None
        async with self._lock:
            channel = await self.broker.connection.channel()
            try:
                queue = await channel.declare_queue(self.broker.topology.parked_queue, passive=True)
                messages: list[AbstractIncomingMessage] = []
                while len(messages) < SCAN:
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    messages.append(message)
                yield messages
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()  # what was not acked goes back


def _visible(message: AbstractIncomingMessage, owner: str | None) -> bool:
    """With API keys on, a key sees the messages of the tasks it made."""
    return owner is None or owner_of(message) == owner
