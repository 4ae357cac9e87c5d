"""A three-node RabbitMQ cluster under load loses a node, and no task is lost.

Run with `make test-cluster` (starts the cluster with scripts/cluster; not in CI)."""

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import invariants
from tests.conftest import Stack, _make_stack
from tests.harness import wait_until
from tests.proxy import Proxy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "cluster")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Proxy]:
    subprocess.run([SCRIPT, "start"], check=True, timeout=300)
    proxy = Proxy(5681, "127.0.0.1", 5682, 5683)  # a load balancer in front of the nodes
    try:
        yield proxy
    finally:
        proxy.close()
        subprocess.run([SCRIPT, "stop"], check=False, timeout=300)


def test_stopping_a_node_under_load_loses_no_task(cluster: Proxy, tmp_path: Path) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{cluster.port}/"
    stack: Stack = _make_stack(url, tmp_path, TIMEBOX_HEARTBEAT="2")
    stack.gateway()
    stack.worker(2)
    accepted: list[str] = []
    refused = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal refused
        with stack.client(timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(
                        "/v1/tasks/burn_cpu",
                        headers={"Request-Timeout": "120"},
                        json={"seconds": 0.1},
                    )
                except httpx.HTTPError:
                    refused += 1
                    continue
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                else:
                    refused += 1
                stop.wait(0.1)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: len(accepted) >= 20, 60, "load before the fault")
        # the node every client is connected to, and so the leader of the queues
        subprocess.run([SCRIPT, "stop-node", "1"], check=True, timeout=120)
        stopped_at = len(accepted)
        wait_until(lambda: len(accepted) >= stopped_at + 20, 120, "load after the fault")
    finally:
        stop.set()
        loader.join()
    with stack.client() as c:
        wait_until(
            lambda: all(
                c.get(f"/v1/tasks/{t}").json()["state"] not in ("queued", "running")
                for t in accepted
            ),
            120,
            "every accepted task to end",
        )
        tally = invariants.check(c, accepted, url, stack.namespace)
    print(f"cluster: {len(accepted)} accepted, {refused} refused during the failover; {tally}")
    stack.stop()
    assert tally.clean, tally
