"""Throughput: echo tasks per second end to end (submitted with 202, counted at the
time of their `succeeded` event), and RPC calls per second with 64 in flight.

Next to them, in the same run, the ceilings of the parts on this machine: FastAPI
hello-world GETs per second from the same load generator, and messages per second one
aio-pika process can publish (with confirms) to a quorum queue and consume back. A task
costs more than one of each: HTTP, and several broker messages (task, events)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import aiohttp

from bench.stack import AMQP_URL, Baseline, CpuMeter, Stack

IN_FLIGHT = 64


async def _last_success(namespace: str, want: set[str]) -> float:
    """Reads the event stream from its start until every task in `want` has succeeded;
    returns the latest of those `succeeded` events' own times (epoch, the worker's
    clock). Called once the submitting is over: reading the stream while the load ran
    cost the load generator 0.7-0.8 ms of CPU a task and RabbitMQ 0.6-1.0 ms (three
    deliveries and acks per task), taken from the system under test."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.get_queue(f"{namespace}.events", ensure=False)
        missing = set(want)
        last = 0.0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal last
            await message.ack()
            if message.type != "timebox.event":
                return
            event = json.loads(message.body)
            if event["type"] == "succeeded" and event["task_id"] in missing:
                missing.discard(event["task_id"])
                last = max(last, event["at"])
                if not missing:
                    done.set()

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        if missing:
            await done.wait()
        return last


async def _end_to_end(url: str, namespace: str, n: int) -> dict[str, Any]:
    """n echo tasks from IN_FLIGHT submitters; the time from the first submit to the
    last task's `succeeded` event."""
    want: set[str] = set()
    ids: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        ids.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(url, connector=connector) as client:

        async def submitter() -> None:
            while not ids.empty():
                i = ids.get_nowait()
                async with client.post("/v1/tasks/echo", json={"payload": i}) as r:
                    if r.status == 202:
                        want.add((await r.json())["id"])

        start, started_at = time.perf_counter(), time.time()
        await asyncio.gather(*(submitter() for _ in range(IN_FLIGHT)))
        submitted = time.perf_counter()
    finished_at = await asyncio.wait_for(_last_success(namespace, want), 300)
    return {
        "tasks": n,
        "accepted": len(want),
        "submit_per_s": round(n / (submitted - start), 1),
        "end_to_end_per_s": round(len(want) / (finished_at - started_at), 1),
    }


async def _calls_per_s(
    url: str, seconds: float, method: str, path: str, meter: CpuMeter | None = None
) -> dict[str, Any]:
    """Closed loop: IN_FLIGHT callers, each sending its next request when the last ends;
    calls answered 200, and the others. With a meter: the CPU each process spent per
    answered call."""
    count = failed = 0
    body = {"payload": 1} if method == "POST" else None
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(url, connector=connector) as client:
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal count, failed
            while time.perf_counter() < end:
                try:
                    async with client.request(method, path, json=body) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:  # a server that broke: counted, not fatal
                    ok = False
                count += ok
                failed += not ok

        if meter is not None:
            meter.start()
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
        took = time.perf_counter() - start
    out: dict[str, Any] = {
        "in_flight": IN_FLIGHT,
        "seconds": round(took, 2),
        "calls": count,
        "failed": failed,
        "calls_per_s": round(count / took, 1),
    }
    if meter is not None:
        out["cpu_ms_per_call"] = meter.ms_per(count)
    return out


async def round_trips(
    n: int,
    message: Callable[[], aio_pika.Message],
    queue_arguments: dict[str, Any],
    prefetch: int,
    consume_arguments: dict[str, Any] | None = None,
) -> float:
    """Publishes n messages to a queue of its own (IN_FLIGHT awaiting their confirms)
    and consumes them back with an ack each; seconds from the first sent to the last
    read."""
    name = f"tbbench-trips-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=prefetch)
        queue = await consumer.declare_queue(name, durable=True, arguments=queue_arguments)
        received, done = 0, asyncio.Event()

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await incoming.ack()
            received += 1
            if received == n:
                done.set()

        tag = await queue.consume(on_message, arguments=consume_arguments)
        window = asyncio.Semaphore(IN_FLIGHT)

        async def publish() -> None:
            async with window:
                await publisher.default_exchange.publish(message(), name)

        start = time.perf_counter()
        await asyncio.gather(*(publish() for _ in range(n)))
        await asyncio.wait_for(done.wait(), 120)
        took = time.perf_counter() - start
        await queue.cancel(tag)  # before the delete: the broker would cancel it, with a warning
        await consumer.queue_delete(name, if_unused=False, if_empty=False)
    return took


async def _amqp_ceiling(n: int) -> dict[str, Any]:
    """One process publishes n messages to a quorum queue and consumes them back with
    acks; messages per second, first sent to last read."""
    took = await round_trips(
        n,
        lambda: aio_pika.Message(b'{"payload": 1}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        {"x-queue-type": "quorum"},
        prefetch=IN_FLIGHT * 4,
    )
    return {"messages": n, "in_flight": IN_FLIGHT, "messages_per_s": round(n / took, 1)}


def run(n: int, rpc_seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "parameters": {
            "worker_slots": 4,
            "in_flight": IN_FLIGHT,
            "worker": "consuming the demo tasks' queue",
        }
    }
    rpc_path = "/v1/tasks/echo?wait=true"
    with Stack() as stack:
        gateway = stack.gateway()
        worker = stack.worker(4)
        out["echo_202"] = asyncio.run(_end_to_end(gateway.url, stack.namespace, n))
        meter = CpuMeter.of_stack(gateway, worker)
        out["echo_rpc"] = asyncio.run(
            _calls_per_s(gateway.url, rpc_seconds, "POST", rpc_path, meter)
        )
    with Baseline(None) as app:
        out["ceiling_fastapi_hello_get"] = asyncio.run(
            _calls_per_s(app.url, rpc_seconds, "GET", "/hello")
        )
    out["ceiling_amqp_quorum_publish_consume"] = asyncio.run(_amqp_ceiling(n * 2))
    return out
