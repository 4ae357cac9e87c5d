"""After a fault: every accepted task reached exactly one terminal event."""

from __future__ import annotations

import asyncio
import collections
import json
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx

from contracts.events import TERMINAL


@dataclass
class Tally:
    checked: int = 0
    lost: int = 0  # unknown to the gateway
    unfinished: int = 0  # known, but no terminal event
    duplicated: int = 0  # more than one terminal event seen by a client
    raw_duplicates: int = 0  # more than one terminal event in the stream itself

    @property
    def clean(self) -> bool:
        return self.lost == self.unfinished == self.duplicated == 0


def check(client: httpx.Client, task_ids: list[str], amqp_url: str, namespace: str) -> Tally:
    tally = Tally(checked=len(task_ids))
    for task_id in task_ids:
        status = client.get(f"/v1/tasks/{task_id}")
        if status.status_code == 404:
            tally.lost += 1
            continue
        if status.json()["state"] in ("queued", "running"):
            tally.unfinished += 1
            continue
        body = client.get(f"/v1/tasks/{task_id}/events").text
        terminals = sum(
            1
            for line in body.splitlines()
            if line.startswith("event: ") and line[7:] in {t.value for t in TERMINAL}
        )
        if terminals != 1:
            tally.duplicated += 1
    per_task = asyncio.run(_raw_terminals(amqp_url, namespace))
    tally.raw_duplicates = sum(1 for t in task_ids if per_task.get(t, 0) > 1)
    return tally


async def _raw_terminals(amqp_url: str, namespace: str) -> collections.Counter[str]:
    """Terminal events per task in the whole stream."""
    terminal = {t.value for t in TERMINAL}
    return collections.Counter(
        event["task_id"]
        for event in await raw_events(amqp_url, namespace)
        if event["type"] in terminal
    )


async def raw_events(amqp_url: str, namespace: str) -> list[dict[str, Any]]:
    """Every task event in the stream, read from its first offset, as the workers and
    gateways published them (a gateway ignores what comes after a terminal event)."""
    events: list[dict[str, Any]] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(f"{namespace}.events", ensure=False)
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            await message.ack()
            if message.type == "timebox.event":
                events.append(json.loads(message.body))

        tag = await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        last = -1
        while seen != last:  # a stream has no end: read until half a second brings nothing
            last = seen
            await asyncio.sleep(0.5)
        await queue.cancel(tag)
    return events
