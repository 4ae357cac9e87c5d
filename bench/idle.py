"""What idle workers cost (not part of `make bench`): `python -m bench.idle [workers]`.

Starts idle workers of the demo tasks and, over a window with no traffic, reads from
/proc the CPU of the workers (their own loops: announcements) and of the local
RabbitMQ, and from `rabbitmq-queues quorum_status` how far the task queue's Raft log
grew: each entry is written to disk and, in a cluster, replicated."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

from bench.stack import CpuMeter, Stack, broker_cpu, raft_index
from compute.pool import cpu_seconds_of
from contracts.tasks import load_tasks
from contracts.topology import Topology

WINDOW = 20.0


def main(workers: int = 1) -> None:
    with Stack() as stack:
        stack.gateway()
        procs = [stack.worker(2) for _ in range(workers)]
        topology = Topology(namespace=stack.namespace)
        names = {task.queue for task in load_tasks(["examples.tasks"]).values()}
        queues = [topology.task_queue(name) for name in sorted(names)]
        time.sleep(3)  # past the start's sweep
        readers: dict[str, Callable[[], float | None] | None] = {
            f"worker {i}": functools.partial(cpu_seconds_of, p.pid) for i, p in enumerate(procs)
        }
        readers["RabbitMQ (whole node)"] = broker_cpu()
        meter = CpuMeter(readers)
        meter.start()
        raft_before = [raft_index(q) for q in queues]
        started = time.monotonic()
        time.sleep(WINDOW)
        elapsed = time.monotonic() - started
        cpu = meter.ms_per(elapsed)
        raft_after = [raft_index(q) for q in queues]
    print(f"{workers} idle worker(s) of {len(queues)} task types, {elapsed:.1f} s window")
    for name, ms in cpu.items():
        if ms is not None:
            print(f"  {name}: {ms:.2f} ms CPU/s")
    grown = [
        a - b
        for a, b in zip(raft_after, raft_before, strict=True)
        if a is not None and b is not None
    ]
    if grown:
        print(f"  task queues' Raft log entries: {sum(grown) / elapsed:.2f}/s in all")
    else:
        print("  Raft indexes: not readable (no local rabbitmq-queues)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
