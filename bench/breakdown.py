"""Where an RPC echo's time goes, from the timestamps of its own events (not part of
`make bench`): `python -m bench.breakdown`."""

import time

import httpx

from bench.stack import Stack
from tests.harness import task_events

STAGES = [
    "client -> queued event made (HTTP, validation, admission)",
    "queued -> running (publish, quorum commit, delivery, slot)",
    "running -> succeeded (child round trip)",
    "succeeded -> response (publish, stream read, wake-up, HTTP)",
    "total",
]


def main(n: int = 200) -> None:
    with Stack() as stack:
        gateway = stack.gateway()
        stack.worker(2)
        with httpx.Client(base_url=gateway.url, timeout=10) as c:
            for _ in range(30):
                c.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 1})
            rows = []
            for _ in range(n):
                t0 = time.time()
                r = c.post("/v1/tasks/echo", params={"wait": "true"}, json={"payload": 1})
                t1 = time.time()
                at = {e[0]: float(e[1]["at"]) for e in task_events(c, r.json()["id"])}  # type: ignore[arg-type]
                rows.append(
                    (
                        at["queued"] - t0,
                        at["running"] - at["queued"],
                        at["succeeded"] - at["running"],
                        t1 - at["succeeded"],
                        t1 - t0,
                    )
                )
    for i, name in enumerate(STAGES):
        values = sorted(row[i] for row in rows)
        print(f"{name:62s} p50 {values[len(values) // 2] * 1000:6.2f} ms")


if __name__ == "__main__":
    main()
