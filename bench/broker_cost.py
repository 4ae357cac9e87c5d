"""What a task costs RabbitMQ, by kind of message.

Counts: a stack (a gateway, a worker of two slots) serves echo RPCs at 64 in flight;
the management API's totals before and after give the messages published, confirmed,
delivered and acked per task, for the task queue, the event stream and the control
exchange, and the event stream read back splits its messages by kind.

CPU: each kind replayed alone the way Timebox sends it (64 publishers, each awaiting
its confirm; one consumer acking), beside the RPCs themselves, blocks interleaved: the
broker's CPU per message of each kind, and what the counts times those leave unexplained.

    python -m bench.broker_cost [--seconds S] [--blocks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
from yarl import URL

from bench.stack import AMQP_URL, CpuMeter, Stack, broker_cpu
from bench.throughput import IN_FLIGHT, _calls_per_s, round_trips
from contracts.messages import EVENT_TYPE, SYNC_TYPE

RPC = "/v1/tasks/echo?wait=true"
FIELDS = ("publish", "confirm", "deliver", "deliver_no_ack", "ack", "redeliver", "publish_in")
SAMPLED_EVERY = 5.0  # seconds: the management API's statistics interval (its default)


def management() -> httpx.Client:
    """The broker's management API (its plugin on port 15672; `make bench` turns it on)."""
    url = URL(AMQP_URL)
    return httpx.Client(
        base_url=f"http://{url.host}:15672/api",
        auth=(url.user or "guest", url.password or "guest"),
        timeout=10,
    )


def _stats(api: httpx.Client, namespace: str) -> dict[str, Counter[str]]:
    """Message totals: the whole broker ('all'), and each queue and exchange of the
    namespace (the workers' control queues summed as 'queue control.*')."""

    def totals(item: dict[str, Any]) -> Counter[str]:
        return Counter({k: v for k, v in item.get("message_stats", {}).items() if k in FIELDS})

    out = {"all": totals(api.get("/overview").json())}
    for kind in ("queues", "exchanges"):
        for item in api.get(f"/{kind}").json():
            name = str(item["name"])
            if name.startswith(namespace + "."):
                name = name.removeprefix(namespace + ".")
                key = f"{kind[:-1]} " + ("control.*" if name.startswith("control.") else name)
                out.setdefault(key, Counter()).update(totals(item))
    return out


def _settled(api: httpx.Client, namespace: str) -> dict[str, Counter[str]]:
    """The totals once the management API has sampled what came before (the RPCs wait
    for their tasks' ends, so nothing of theirs is still moving)."""
    time.sleep(SAMPLED_EVERY + 1)
    return _stats(api, namespace)


async def _mark(namespace: str) -> str:
    """A sync marker of our own in the event stream (gateways pass over others' markers)."""
    mark = f"bench-{uuid.uuid4().hex}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(mark.encode(), type=SYNC_TYPE)
        await channel.default_exchange.publish(message, f"{namespace}.events")
    return mark


async def _stream_kinds(namespace: str, first: str, last: str) -> Counter[str]:
    """The event stream's messages between two markers, by kind: each event type, the
    workers' announcements, the gateways' sync markers."""
    kinds: Counter[str] = Counter()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.get_queue(f"{namespace}.events", ensure=False)
        between, past = False, asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal between
            await message.ack()
            if message.body in (first.encode(), last.encode()):
                between = message.body == first.encode()
                if not between:
                    past.set()
            elif between:
                kind = str(message.type)
                if kind == EVENT_TYPE:
                    kind = f"event {json.loads(message.body)['type']}"
                kinds[kind] += 1

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        await asyncio.wait_for(past.wait(), 60)
    return kinds


def count(stack: Stack, url: str, seconds: float) -> dict[str, Any]:
    """Per task: each counter of each queue or exchange that moved during the RPCs."""
    with management() as api:
        before = _settled(api, stack.namespace)
        first = asyncio.run(_mark(stack.namespace))
        calls = asyncio.run(_calls_per_s(url, seconds, "POST", RPC))
        last = asyncio.run(_mark(stack.namespace))
        after = _settled(api, stack.namespace)
    tasks = after["exchange tasks"]["publish_in"] - before["exchange tasks"]["publish_in"]
    per_task: dict[str, dict[str, float]] = {}
    for where, totals in after.items():
        moved = {k: totals[k] - before.get(where, Counter())[k] for k in totals}
        kept = {k: round(v / tasks, 2) for k, v in moved.items() if v}
        if kept:
            per_task[where] = kept
    kinds = asyncio.run(_stream_kinds(stack.namespace, first, last))
    return {
        "tasks": tasks,
        "rpcs_answered": calls["calls"],
        "per_task": per_task,
        "event_stream_per_task": {k: round(v / tasks, 3) for k, v in sorted(kinds.items())},
    }


# -- CPU per message of each kind, replayed alone ----------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of message as Timebox sends it: the queue it goes to, how it is read."""

    queue_arguments: dict[str, Any]
    message: Callable[[], aio_pika.Message]
    consume_arguments: dict[str, Any] = field(default_factory=dict)
    prefetch: int = IN_FLIGHT * 4


def _task() -> aio_pika.Message:
    return aio_pika.Message(
        b'{"payload": 1}',
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=60,
        headers={"x-deadline": int(time.time() * 1000) + 60_000},
    )


def _event() -> aio_pika.Message:
    body = {"type": "succeeded", "task_id": uuid.uuid4().hex, "at": time.time(), "output": 1}
    return aio_pika.Message(json.dumps(body).encode(), type=EVENT_TYPE)


KINDS = {
    "task, quorum queue": Kind({"x-queue-type": "quorum"}, _task),
    # a worker's prefetch is its slots: the broker hands over two messages at a time
    "task, quorum queue, prefetch 2": Kind({"x-queue-type": "quorum"}, _task, prefetch=2),
    "task, classic queue": Kind({"x-queue-type": "classic"}, _task),
    "event, stream": Kind({"x-queue-type": "stream"}, _event, {"x-stream-offset": "next"}),
}


async def _replay(kind: Kind, n: int) -> None:
    """n messages, IN_FLIGHT publishers each awaiting its confirm, one consumer acking
    each message as it comes."""
    await round_trips(n, kind.message, kind.queue_arguments, kind.prefetch, kind.consume_arguments)


def cpu(stack: Stack, url: str, blocks: int, n: int, seconds: float) -> dict[str, float]:
    """RabbitMQ's CPU per message of each kind, and per RPC: medians over interleaved
    blocks (ms)."""
    read = broker_cpu()
    assert read is not None, "the broker's CPU is read from /proc: run it on this machine"
    samples: dict[str, list[float]] = {k: [] for k in (*KINDS, "echo RPC, 64 in flight")}
    for b in range(blocks):
        order = list(samples) if b % 2 == 0 else list(reversed(samples))
        for kind in order:
            meter = CpuMeter({"rabbitmq": read})
            meter.start()
            if kind in KINDS:
                asyncio.run(_replay(KINDS[kind], n))
                done = n
            else:
                done = asyncio.run(_calls_per_s(url, seconds, "POST", RPC))["calls"]
            ms = meter.ms_per(done)["rabbitmq"]
            assert ms is not None
            samples[kind].append(ms)
    return {k: round(statistics.median(v), 3) for k, v in samples.items()}


def run(seconds: float, blocks: int, n: int) -> dict[str, Any]:
    with Stack() as stack:
        gateway = stack.gateway()
        stack.worker(2)
        asyncio.run(_calls_per_s(gateway.url, 1, "POST", RPC))  # warm-up
        counted = count(stack, gateway.url, seconds)
        ms = cpu(stack, gateway.url, blocks, n, seconds)
    counted["rabbitmq_cpu_ms_per_message"] = ms
    per_task = counted["per_task"]
    # the RPC's broker CPU, next to what its messages would cost sent in the replays' way
    counted["rabbitmq_cpu_ms_per_rpc"] = {
        "measured": ms["echo RPC, 64 in flight"],
        "its task and events, replayed": round(
            per_task["queue tasks.default"]["publish"] * ms["task, quorum queue"]
            + per_task["queue events"]["publish"] * ms["event, stream"],
            3,
        ),
    }
    return counted


def table(results: dict[str, Any]) -> str:
    """Per task: each queue's and exchange's counters; the event stream by kind; the
    broker's CPU per message of each kind and per RPC."""
    lines = ["| where | per task |", "|---|---|"]
    for where, moved in results["per_task"].items():
        lines.append(f"| {where} | " + ", ".join(f"{k} {v}" for k, v in moved.items()) + " |")
    kinds = results["event_stream_per_task"]
    lines.append("| event stream, by kind | " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    lines += ["", "| RabbitMQ CPU (ms) | per message or RPC |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["rabbitmq_cpu_ms_per_message"].items()]
    lines += [f"| RPC: {k} | {v} |" for k, v in results["rabbitmq_cpu_ms_per_rpc"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    results = run(args.seconds, args.blocks, args.messages)
    print(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
