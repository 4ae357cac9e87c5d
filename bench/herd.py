"""What each task costs the task queues' Raft logs as workers are added (not part of
`make bench`): `python -m bench.herd WORKERS [TASKS]`.

Workers of every task type pull (compute/dispatch.py). Each task a gateway confirms is
announced to all of them; each with a free slot then asks its queue for it, and on a
quorum queue every `basic.get`, an empty one too, and every consumer started or
cancelled for a lease, is an entry in the queue's Raft log — written to disk and, in a
cluster, replicated. Sends echo and process_text tasks in turn (202, 50 a second) and
reads the logs' growth with `rabbitmq-queues quorum_status` (local broker only), and
the CPU RabbitMQ and the workers (children included) spent per task, from `/proc`."""

from __future__ import annotations

import sys
import time

import httpx

from bench.stack import CpuMeter, Stack, broker_cpu, raft_index
from contracts.topology import Topology
from tests.harness import tree_cpu

TYPES = ("echo", "process_text")
INPUTS = {"echo": {"payload": 1}, "process_text": {"text": "a b c"}}


def main(workers: int, tasks: int = 300, **env: str) -> None:
    with Stack(**env) as stack:
        gateway = stack.gateway()
        pids = [stack.worker(2).pid for _ in range(workers)]
        queues = [Topology(namespace=stack.namespace).task_queue(t) for t in TYPES]
        time.sleep(2)  # past the workers' first sweep
        cpu = CpuMeter(
            {
                "rabbitmq": broker_cpu(),
                "workers": lambda: sum(tree_cpu(pid, include_root=True) for pid in pids),
            }
        )
        before = [raft_index(q) for q in queues]
        cpu.start()
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            for i in range(tasks):
                task = TYPES[i % len(TYPES)]
                assert client.post(f"/v1/tasks/{task}", json=INPUTS[task]).status_code == 202
                time.sleep(0.02)
        time.sleep(1.5)  # the last ones run
        after = [raft_index(q) for q in queues]
        spent = cpu.ms_per(tasks)
    pairs = [(a, b) for a, b in zip(after, before, strict=True) if a is not None and b is not None]
    if len(pairs) < len(queues):
        print("Raft indexes not readable (no local rabbitmq-queues)")
        return
    grown = sum(a - b for a, b in pairs)
    print(
        f"{workers} worker(s) of every type, 2 slots each, {tasks} tasks ({', '.join(TYPES)} "
        f"in turn, 50/s): {grown} Raft log entries on their queues, {grown / tasks:.2f} a task; "
        f"CPU a task: RabbitMQ {spent['rabbitmq']} ms, the workers and their children "
        f"{spent['workers']} ms (the idle ones' polls included)"
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
