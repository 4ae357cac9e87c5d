"""SSE fan-out: N subscribers of one task on one gateway; memory per subscriber and
event delivery latency (receive time minus the event's own time)."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from typing import Any

import httpx

from bench.latency import percentiles
from bench.stack import AMQP_URL, Stack, rss_bytes
from tests.harness import Announcer


async def _subscribe(
    port: int,
    task_id: str,
    n: int,
    opened: asyncio.Event,
    lags: list[float],
    received: list[int],
) -> None:
    count = 0

    async def one() -> None:
        nonlocal count
        events = 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        first = True
        try:
            while line := await reader.readline():
                if first and line.startswith(b"HTTP/1.1 200"):
                    first = False
                    count += 1
                    if count == n:
                        opened.set()
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    lags.append(time.time() - event["at"])
                    events += 1
                    if event["type"] == "succeeded":
                        received.append(events)
                        break
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)


def run(n: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
    with Stack() as stack:
        gateway = stack.gateway()
        # a worker that takes nothing: the task stays queued until a real one starts
        busy = Announcer(AMQP_URL, stack.namespace, ["burn_cpu"])
        gateway.wait_hears(busy.name)
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            task_id = c.post("/v1/tasks/burn_cpu", json={"seconds": 2}).json()["id"]
        busy.stop()
        before = rss_bytes(gateway.pid)
        lags: list[float] = []
        received: list[int] = []  # events each subscriber that saw the end was sent

        async def scenario() -> float:
            opened = asyncio.Event()
            clients = asyncio.create_task(
                _subscribe(gateway.port, task_id, n, opened, lags, received)
            )
            await asyncio.wait_for(opened.wait(), 300)
            held = rss_bytes(gateway.pid)
            lags.clear()  # the replayed `queued` event is history, not delivery
            # only now does a worker start: every event after this is delivered live
            await asyncio.get_running_loop().run_in_executor(None, stack.worker, 1)
            await asyncio.wait_for(clients, 300)
            return held

        held = asyncio.run(scenario())
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            emitted = c.get(f"/v1/tasks/{task_id}/events").text.count("\ndata: ")
    received.sort()
    return {
        "parameters": {
            "subscribers": n,
            "task": "burn_cpu 2 s (about 8 progress events, one per 0.25 s)",
            "client": "one asyncio process, raw sockets, on the same machine",
            "events": "a live subscriber that is behind skips progress reports of a fraction "
            "only that a later event replaces; every other event goes to all",
        },
        "subscribers_finished": len(received),
        "events_emitted": emitted,
        "events_received_per_subscriber": {
            "min": received[0] if received else 0,
            "p50": received[len(received) // 2] if received else 0,
            "max": received[-1] if received else 0,
        },
        "gateway_rss_before_mb": round(before / 2**20, 1),
        "gateway_rss_with_subscribers_mb": round(held / 2**20, 1),
        "memory_per_subscriber_kb": round((held - before) / n / 1024, 1),
        "delivery": percentiles(lags),
    }
