"""Latency of the system's own path, next to the floors under it, measured in the same
run: aio-pika publish→consume round trips on a quorum queue (the task's hop) and on a
stream (the event's hop back), and a FastAPI hello-world GET. An RPC needs all three,
so their sum is the least an RPC can take on this machine with this broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import httpx
from pamqp.common import FieldTable

from bench.stack import AMQP_URL, Baseline, CpuMeter, Stack


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"n": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999)}


def _timed(n: int, call: Any) -> list[float]:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t)
    return samples


async def _amqp_round_trips(n: int, queue_type: str) -> list[float]:
    """Publish (with a confirm) → delivered to a consumer, one message at a time."""
    name = f"tbbench-floor-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=100)  # a stream consumer needs one
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": queue_type}
        )
        got: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.put_nowait(time.perf_counter())
            await message.ack()

        arguments: FieldTable | None = (
            {"x-stream-offset": "next"} if queue_type == "stream" else None
        )
        tag = await queue.consume(on_message, arguments=arguments)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            await channel.default_exchange.publish(aio_pika.Message(b"{}", delivery_mode=2), name)
            samples.append(await got.get() - t)
        await queue.cancel(tag)
        await channel.queue_delete(name, if_unused=False, if_empty=False)
    return samples


def refusals(n: int) -> dict[str, Any]:
    """How long a refusal takes: a backlog too long for the deadline (503), and an
    input too big for it (422), once run times are known."""
    with Stack() as stack:
        gateway = stack.gateway()
        stack.worker(1)
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            for _ in range(6):
                c.post("/v1/tasks/burn_cpu", params={"wait": "true"}, json={"seconds": 0.3})
            for _ in range(20):  # about 10 s of work queued ahead
                c.post("/v1/tasks/burn_cpu", json={"seconds": 0.5})

            def backlog(i: int) -> None:
                r = c.post(
                    "/v1/tasks/burn_cpu", headers={"Request-Timeout": "2"}, json={"seconds": 0.3}
                )
                assert r.status_code == 503, r.text

            def too_big(i: int) -> None:
                r = c.post(
                    "/v1/tasks/burn_cpu", headers={"Request-Timeout": "2"}, json={"seconds": 10}
                )
                assert r.status_code == 422, r.text

            return {
                "refusal_503_backlog": percentiles(_timed(n, backlog)),
                "refusal_422_unmeetable": percentiles(_timed(n, too_big)),
            }


def rpc_and_submit(n: int, *worker_args: str, **env: str) -> dict[str, dict[str, Any]]:
    """Sequential RPCs, with the CPU each process spent on one, then sequential 202s."""
    with Stack() as stack:
        gateway = stack.gateway()
        worker = stack.worker(2, *worker_args, **env)
        with httpx.Client(base_url=gateway.url, timeout=10) as c:
            for _ in range(50):  # warm-up
                c.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 0})

            def rpc(i: int) -> None:
                r = c.post("/v1/tasks/echo", headers={"Prefer": "wait"}, json={"payload": i})
                assert r.status_code == 200, r.text

            def submit(i: int) -> None:
                assert c.post("/v1/tasks/echo", json={"payload": i}).status_code == 202

            meter = CpuMeter.of_stack(gateway, worker)
            meter.start()
            rpcs: dict[str, Any] = percentiles(_timed(n, rpc))
            rpcs["cpu_ms_per_call"] = meter.ms_per(n)
            return {"rpc": rpcs, "submit": percentiles(_timed(n, submit))}


def run(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "parameters": {
            "calls": n,
            "sequential": True,
            "client": "httpx",
            "worker": "2 slots, consuming the demo tasks' queue",
        }
    }
    default = rpc_and_submit(n)
    out["rpc_echo"] = default["rpc"]
    out["submit_202"] = default["submit"]
    out.update(refusals(max(100, n // 4)))
    quorum = asyncio.run(_amqp_round_trips(n, "quorum"))
    stream = asyncio.run(_amqp_round_trips(n, "stream"))
    with Baseline(None) as app, httpx.Client(base_url=app.url, timeout=10) as c:
        _timed(50, lambda i: c.get("/hello"))
        hello = _timed(n, lambda i: c.get("/hello"))
    out["floor_amqp_publish_consume_quorum"] = percentiles(quorum)
    out["floor_amqp_publish_consume_stream"] = percentiles(stream)
    out["floor_fastapi_hello_get"] = percentiles(hello)
    # the three hops in sequence, sample by sample: what an RPC cannot go below here
    path = [a + b + c for a, b, c in zip(quorum, stream, hello, strict=True)]
    out["floor_rpc_path_sum"] = percentiles(path)
    return out


def tracing(n: int, blocks: int) -> dict[str, Any]:
    """Sequential echo RPCs with tracing off (the API alone: no SDK configured) and with
    every span exported over OTLP to a collector in this process; both stacks up at
    once, blocks interleaved."""
    from tests.collector import Collector

    collector = Collector()
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
    samples: dict[str, list[float]] = {"off": [], "otlp": []}
    try:
        with Stack() as off, Stack(**env) as on, contextlib.ExitStack() as clients:
            client = {}
            for name, stack in (("off", off), ("otlp", on)):
                url = stack.gateway().url
                stack.worker(2)
                client[name] = clients.enter_context(httpx.Client(base_url=url, timeout=10))

            def rpc(name: str) -> Callable[[int], None]:
                def call(i: int) -> None:
                    r = client[name].post("/v1/tasks/echo?wait=true", json={"payload": i})
                    assert r.status_code == 200, r.text

                return call

            for name in samples:
                _timed(50, rpc(name))  # warm-up
            for b in range(blocks):
                for name in list(samples) if b % 2 == 0 else reversed(list(samples)):
                    samples[name] += _timed(max(1, n // blocks), rpc(name))
    finally:
        collector.close()
    out: dict[str, Any] = {name: percentiles(s) for name, s in samples.items()}
    for p in ("p50_ms", "p99_ms"):
        out[f"{p.removesuffix('_ms')}_ratio"] = round(out["otlp"][p] / out["off"][p], 3)
    out["spans_exported"] = len(collector.spans)
    return out
