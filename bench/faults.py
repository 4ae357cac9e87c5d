"""Faults: tasks keep coming while workers are frozen and cut off from the broker;
what went wrong is counted. Not part of `make bench`.

    python -m bench.faults [--seconds 200] [--rate 3]

Two gateways, two workers of two slots, `exclusive` tasks (a second run at once
fails, saying so) of 0.2-3 s with deadlines of 2-8 s, `rate` a second over both
gateways. Every 10-20 s, one fault at random: a worker frozen (SIGSTOP) for 2-6 s,
one worker's connection closed, or every connection closed. Then, for each task: its
ending; double runs (`runs twice at once`); statuses that do not describe one run
(worker, start or attempts not those of its last run); endings more than 0.2 s past
the deadline; tasks with no ending at all."""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from datetime import datetime
from typing import Any

import httpx

from bench.stack import Stack
from contracts.events import TaskState
from tests.harness import Worker, task_events


def faults(workers: list[Worker], until: float, log: list[str]) -> None:
    kinds = ["freeze", "drop", "drop_all"]
    while time.time() < until - 20:
        time.sleep(random.uniform(10, 20))
        worker = random.choice(workers)
        kind = kinds[len(log) % len(kinds)]
        log.append(f"{time.time():.1f} {kind} {worker.status_name if kind != 'drop_all' else ''}")
        if kind == "freeze":
            worker.signal(signal.SIGSTOP)
            time.sleep(random.uniform(2, 6))
            worker.signal(signal.SIGCONT)
        elif kind == "drop":
            worker.drop_connection()
        else:
            subprocess.run(
                ["rabbitmqctl", "close_all_connections", "timebox fault run"],
                check=True,
                capture_output=True,
                timeout=30,
            )


def judge(client: httpx.Client, task_id: str) -> dict[str, Any]:
    """What happened to one task; a task with no ending 30 s past its deadline is lost."""
    give_up = time.time() + 30
    while not TaskState(client.get(f"/v1/tasks/{task_id}").json()["state"]).terminal:
        if time.time() > give_up:
            return {
                "ending": "lost",
                "twice": False,
                "consistent": True,
                "late": None,
                "attempts": 0,
            }
        time.sleep(0.5)
    events = task_events(client, task_id)
    end = events[-1][1]
    runs = [data for kind, data, _ in events if kind == "running"]
    status = client.get(f"/v1/tasks/{task_id}").json()
    consistent = not runs or (
        status["worker"] == runs[-1]["worker"]
        and status["attempts"] == len({run["attempt"] for run in runs})
        and abs(datetime.fromisoformat(status["started_at"]).timestamp() - float(runs[-1]["at"]))  # type: ignore[arg-type]
        < 0.002
    )
    late = float(end["at"]) - datetime.fromisoformat(status["deadline"]).timestamp()  # type: ignore[arg-type]
    twice = "runs twice at once" in json.dumps(end)
    if twice or not consistent:
        print("twice:" if twice else "inconsistent:", task_id, status, events)
    return {
        "ending": events[-1][0],
        "twice": twice,
        "consistent": consistent,
        "late": late if end["type"] == "aborted" else None,
        "attempts": len({run["attempt"] for run in runs}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=200)
    parser.add_argument("--rate", type=float, default=3)
    args = parser.parse_args()
    with Stack(TIMEBOX_TASK_MODULES="examples.tasks,tests.sample_tasks") as stack:
        gateways = [stack.gateway(), stack.gateway()]
        workers = [stack.worker(2), stack.worker(2)]
        until = time.time() + args.seconds
        log: list[str] = []
        injector = threading.Thread(target=faults, args=(workers, until, log), daemon=True)
        injector.start()
        ids: list[tuple[str, str]] = []
        refused: Counter[int] = Counter()
        key = uuid.uuid4().hex[:8]
        clients = [httpx.Client(base_url=g.url, timeout=60) for g in gateways]
        while time.time() < until:
            client = clients[len(ids) % 2]
            body = {"key": f"{key}-{len(ids)}-{refused.total()}", "seconds": random.uniform(0.2, 3)}
            timeout = f"{random.uniform(2, 8):.1f}"
            try:
                r = client.post(
                    "/v1/tasks/exclusive", json=body, headers={"Request-Timeout": timeout}
                )
            except httpx.TransportError:
                refused[0] += 1
            else:
                if r.status_code == 202:
                    ids.append((gateways[len(ids) % 2].url, r.json()["id"]))
                else:
                    refused[r.status_code] += 1
            time.sleep(1 / args.rate)
        injector.join()
        by_url = {g.url: c for g, c in zip(gateways, clients, strict=True)}
        judged = [judge(by_url[url], task_id) for url, task_id in ids]
    endings = Counter(j["ending"] for j in judged)
    late = sorted(j["late"] for j in judged if j["late"] is not None)
    print("faults:", *log, sep="\n  ")
    print(f"tasks accepted {len(ids)}, refused {dict(refused)}; endings {dict(endings)}")
    print(f"double runs {sum(j['twice'] for j in judged)}")
    print(f"inconsistent statuses {sum(not j['consistent'] for j in judged)}")
    print(f"run more than once (one after the other) {sum(j['attempts'] > 1 for j in judged)}")
    if late:
        print(
            f"aborted {len(late)}: lateness p50 {1000 * late[len(late) // 2]:.0f} ms, "
            f"max {1000 * late[-1]:.0f} ms; over 0.2 s: {sum(x > 0.2 for x in late)}"
        )


if __name__ == "__main__":
    main()
