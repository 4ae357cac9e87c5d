"""Metrics, logs and the demo page in a real browser."""

import json
import logging
import re
import shutil

import httpx
import pytest

from contracts.logs import _FailedAttempts
from tests.conftest import Stack
from tests.harness import free_port, task_events

pytestmark = pytest.mark.timeout(90)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_gateway_and_worker_metrics_count_outcomes_and_cpu(make_stack) -> None:
    stack: Stack = make_stack(TIMEBOX_ADMISSION="false")
    stack.gateway()
    port = free_port()
    stack.worker(1, "--metrics-port", str(port))
    with stack.client() as client:
        aborted = client.post(
            "/v1/tasks/burn_cpu",
            params={"wait": "true"},
            headers={"Request-Timeout": "1"},
            json={"seconds": 5},
        )
        assert aborted.status_code == 504
        # once run times are known, a task that cannot finish is not started
        for _ in range(5):
            assert (
                client.post(
                    "/v1/tasks/burn_cpu", params={"wait": "true"}, json={"seconds": 0.2}
                ).status_code
                == 200
            )
        dropped = client.post(
            "/v1/tasks/burn_cpu", headers={"Request-Timeout": "0.3"}, json={"seconds": 0.2}
        ).json()["id"]
        assert task_events(client, dropped)[-1][0] == "expired"

        gateway_text = client.get("/metrics").text
        assert (
            metric(gateway_text, "timebox_requests_total", task="burn_cpu", outcome="succeeded")
            == 5
        )
        assert (
            metric(gateway_text, "timebox_requests_total", task="burn_cpu", outcome="aborted") == 1
        )
        assert metric(gateway_text, "timebox_broker_connected") == 1
        assert (
            metric(gateway_text, "timebox_gateway_queue_wait_seconds_count", task="burn_cpu") == 6
        )

    worker_text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(worker_text, "timebox_tasks_total", task="burn_cpu", outcome="succeeded") == 5
    assert metric(worker_text, "timebox_tasks_total", task="burn_cpu", outcome="aborted") == 1
    assert metric(worker_text, "timebox_tasks_total", task="burn_cpu", outcome="expired") == 1
    assert metric(worker_text, "timebox_abort_lateness_seconds_count", task="burn_cpu") == 1
    wasted = metric(worker_text, "timebox_wasted_cpu_seconds_total", task="burn_cpu")
    assert 0.5 < wasted < 1.2
    useful = metric(worker_text, "timebox_cpu_seconds_total", task="burn_cpu", outcome="succeeded")
    assert 0.8 < useful < 1.5
    assert 0.1 < metric(worker_text, "timebox_saved_cpu_seconds_total", task="burn_cpu") < 0.5
    assert (
        metric(worker_text, "timebox_run_seconds_count", task="burn_cpu", outcome="succeeded") == 5
    )
    assert metric(worker_text, "timebox_queue_wait_seconds_count", task="burn_cpu") == 6
    assert metric(worker_text, "timebox_slots") == 1


def test_json_logs_give_one_line_per_outcome_with_timings(make_stack) -> None:
    stack: Stack = make_stack(TIMEBOX_LOG_FORMAT="json")
    stack.gateway()
    worker = stack.worker(1)
    with stack.client() as client:
        task_id = client.post(
            "/v1/tasks/burn_cpu",
            params={"wait": "true"},
            headers={"Request-Timeout": "1"},
            json={"seconds": 5},
        ).json()["task"]["id"]
    line = worker.wait_for_line(rf'"task_id": "{task_id}"')
    entry = json.loads(line)
    assert entry["outcome"] == "aborted"
    assert entry["task"] == "burn_cpu"
    assert entry["late_by"] <= 0.05
    assert entry["cpu_seconds"] > 0.5
    assert entry["ran"] > 0.5
    assert "from the deadline" in entry["message"]
    assert worker.count(task_id) == 1


def test_a_broker_away_for_minutes_is_told_once_a_minute_not_at_every_attempt() -> None:
    """aio-pika warns of each failed attempt to connect, once a reconnect interval."""
    keep = _FailedAttempts()
    start = 1_000_000.0

    def attempt(at: float, msg: str = "Connection attempt to %s failed: %s") -> bool:
        record = logging.makeLogRecord({"msg": msg, "args": ("amqp://x", "refused")})
        record.created = start + at
        return keep.filter(record)

    told = [second for second in range(150) if attempt(second)]
    assert told == [0, 60, 120]
    assert attempt(150.5, "Connection to %s closed. Reconnecting after %r seconds.")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_the_demo_page_runs_a_task_live_in_a_browser(session_stack: Stack) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(session_stack.url + "/")
            select = page.get_by_test_id("task-select")
            expect(select).to_have_value("count_primes")
            assert json.loads(page.get_by_test_id("task-input").input_value()) == {"n": 300_000}
            # about a second here: long enough for progress reports (one per 0.25 s)
            page.get_by_test_id("task-input").fill('{"n": 1000000}')
            page.get_by_test_id("submit").click()
            expect(page.get_by_test_id("state")).to_have_text("succeeded", timeout=30_000)
            assert json.loads(page.get_by_test_id("result").inner_text()) == {"count": 78498}
            expect(page.get_by_test_id("progress")).to_have_attribute("value", "1")
            log = page.get_by_test_id("event-log").inner_text()
            assert "running" in log
            assert "progress" in log
        finally:
            browser.close()
