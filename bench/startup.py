"""What a gateway spends reading the event stream: at startup, and after its broker
connection drops (only what is new). Not part of `make bench`:

    python -m bench.startup [EVENTS]

fills a fresh namespace's stream with EVENTS events (default 150,000: a third each
`queued`, `running` and `succeeded`, of `echo` tasks), then:

1. starts a gateway on it through a loopback proxy, with the default maximum timeout:
   every event is in its live window (gateway/eventlog.py), read before it is ready.
   Reports how long it took to become ready and the CPU it spent;
2. drops that gateway's connections and reports the CPU it spends in the 10 s after
   it has reconnected, with `/healthz` answer times meanwhile. Before that, the memory
   its task table holds: its resident set size minus that of a gateway reading the
   same stream with a table of 100 tasks, per task (a third of the events);
3. starts a second gateway with a maximum timeout of 1 s, once the events are older
   than its live window: they are its history, read after it is ready. Reports when
   it was ready, when it had read the history, and `/healthz` answer times meanwhile.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid

import httpx
from yarl import URL

from bench.stack import AMQP_URL, Stack, rss_bytes
from compute.pool import cpu_seconds_of
from contracts.events import TaskEvent
from tests.harness import echo_lifecycle, fill_stream
from tests.proxy import Proxy

BATCH = 3000
AFTER = 10.0  # seconds watched after the reconnect
SHORT_TIMEOUT = 1.0  # the second gateway's maximum timeout: a live window of about 2 s


async def fill(namespace: str, n: int) -> None:
    events: list[TaskEvent] = []
    while len(events) < n:
        events += echo_lifecycle(str(uuid.uuid4()))
    await fill_stream(AMQP_URL, namespace, events[:n], BATCH)


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
            _memory(stack, gateway.pid, n)
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
                print(
                    f"after a reconnect: {used:.2f} s of CPU in {AFTER:.0f} s; {_answers(answers)}"
                )
            gateway.stop()
            _history(stack, n)
    finally:
        proxy.close()


def _memory(stack: Stack, pid: int, n: int) -> None:
    held = rss_bytes(pid)
    small = stack.gateway(TIMEBOX_TASK_TABLE_SIZE="100")
    base = rss_bytes(small.pid)
    small.stop()
    tasks = n // 3
    print(
        f"memory: {held / 2**20:.0f} MiB resident with {tasks} tasks in the table, "
        f"{base / 2**20:.0f} MiB with 100: {(held - base) / tasks / 1024:.1f} KiB a task"
    )


def _history(stack: Stack, n: int) -> None:
    started = time.monotonic()
    gateway = stack.gateway(
        TIMEBOX_MAX_TIMEOUT=str(SHORT_TIMEOUT), TIMEBOX_DEFAULT_TIMEOUT=str(SHORT_TIMEOUT)
    )
    ready = time.monotonic() - started
    lines = len(gateway.lines)
    answers = []
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        while not gateway.count(r"read the event history"):
            t = time.perf_counter()
            client.get("/healthz")
            answers.append(time.perf_counter() - t)
            time.sleep(0.05)
    line = gateway.wait_for_line(r"read the event history", 1, start=lines)
    found = re.search(r"(\d+) events before offset \d+ in ([\d.]+) s", line)
    assert found, line
    print(
        f"the same {n} events as history (max timeout {SHORT_TIMEOUT:.0f} s): ready after "
        f"{ready:.1f} s; {found[1]} events of history read in {found[2]} s more, "
        + _answers(answers)
    )


def _answers(seconds: list[float]) -> str:
    if not seconds:
        return "/healthz not asked"
    seconds = sorted(seconds)
    p50, top = seconds[len(seconds) // 2] * 1000, seconds[-1] * 1000
    return f"/healthz p50 {p50:.1f} ms, max {top:.0f} ms"


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150_000)
