"""What a gateway spends reading the event stream: at startup (the whole retention
window) and after its broker connection drops (only what is new). Not part of `make
bench`:

    python -m bench.startup [EVENTS]

fills a fresh namespace's stream with EVENTS events (default 150,000: a third each
`queued`, `running` and `succeeded`, of `echo` tasks), starts a gateway on it through
a loopback proxy, and reports how long it took to become ready and the CPU it spent;
then drops its connections and reports the CPU it spends in the 10 s after it has
reconnected, with `/healthz` answer times meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import aio_pika
import httpx
from yarl import URL

from bench.stack import AMQP_URL, Stack
from compute.pool import cpu_seconds_of
from contracts.amqp import publish_event
from contracts.declare import declare
from contracts.events import EventType, TaskEvent
from contracts.topology import Topology
from tests.proxy import Proxy

BATCH = 3000
AFTER = 10.0  # seconds watched after the reconnect


def _events(n: int) -> list[TaskEvent]:
    events: list[TaskEvent] = []
    while len(events) < n:
        task = {"task_id": str(uuid.uuid4()), "task": "echo"}
        events += [
            TaskEvent(type=EventType.QUEUED, deadline_ms=int(time.time() * 1000), **task),
            TaskEvent(type=EventType.RUNNING, worker="w:1", attempt=1, **task),
            TaskEvent(type=EventType.SUCCEEDED, worker="w:1", result={"payload": 1}, **task),
        ]
    return events[:n]


async def fill(namespace: str, n: int) -> None:
    topology = Topology(namespace=namespace)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, topology, [])  # the stream, as a gateway declares it
        events = _events(n)
        for i in range(0, n, BATCH):
            await asyncio.gather(
                *(
                    publish_event(channel, topology.events_stream, event, confirm_within=60)
                    for event in events[i : i + BATCH]
                )
            )


def _cpu(pid: int) -> float:
    used = cpu_seconds_of(pid)
    assert used is not None, f"process {pid} is gone"
    return used


def main(n: int) -> None:
    broker = URL(AMQP_URL)
    proxy = Proxy(broker.port or 5672, broker.host or "127.0.0.1")
    try:
        with Stack() as stack:
            asyncio.run(fill(stack.namespace, n))
            started = time.monotonic()
            gateway = stack.gateway(TIMEBOX_AMQP_URL=str(broker.with_port(proxy.port)))
            ready = time.monotonic() - started
            spent = _cpu(gateway.pid)
            print(
                f"{n} events: ready after {ready:.1f} s, {spent:.1f} s of CPU "
                f"({spent / n * 1e6:.0f} µs an event, the gateway's own startup included)"
            )
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                lines = len(gateway.lines)
                proxy.drop()
                gateway.wait_for_line("reconnected to RabbitMQ", 60, start=lines)
                cpu = _cpu(gateway.pid)
                end = time.monotonic() + AFTER
                answers = []
                while time.monotonic() < end:
                    t = time.perf_counter()
                    client.get("/healthz")
                    answers.append(time.perf_counter() - t)
                    time.sleep(0.05)
                used = _cpu(gateway.pid) - cpu
                answers.sort()
                print(
                    f"after a reconnect: {used:.2f} s of CPU in {AFTER:.0f} s; /healthz p50 "
                    f"{answers[len(answers) // 2] * 1000:.1f} ms, max {answers[-1] * 1000:.0f} ms"
                )
    finally:
        proxy.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150_000)
