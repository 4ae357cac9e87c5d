"""Metrics, logs and the demo page in a real browser."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from urllib.parse import urlsplit

import httpx
import pytest

from runtime.logs import _FailedAttempts
from tests.conftest import Stack
from tests.harness import Gateway, browser, free_port, metric, task_events, wait_until
from tests.proxy import Proxy, url_to_port

pytestmark = pytest.mark.timeout(90)


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
        # where the fleet's CPU went, from the events: the worker's own figures
        fleet = "timebox_fleet_cpu_seconds_total"
        delivered = metric(
            gateway_text, fleet, task="burn_cpu", use="delivered", reason="succeeded"
        )
        aborted = metric(gateway_text, fleet, task="burn_cpu", use="wasted", reason="aborted")
        saved = "timebox_fleet_saved_cpu_seconds_total"
        expired = metric(gateway_text, saved, task="burn_cpu", reason="expired")

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
    assert delivered == pytest.approx(useful, abs=0.01)
    assert aborted == pytest.approx(wasted, abs=0.01)
    assert 0.1 < expired < 0.5  # at the expected run time of its input
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
    from playwright.sync_api import expect

    with browser() as chromium:
        page = chromium.new_page()
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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
@pytest.mark.parametrize("stream_waits", [True, False], ids=["stream-waits", "status-followed"])
def test_the_demo_page_follows_its_task_across_a_gateway_restart(
    make_stack, amqp_url: str, stream_waits: bool
) -> None:
    """The gateway dies while a page watches a task; the one that replaces it on the
    same port is slow to reach RabbitMQ. The page's EventSource reconnects by itself,
    and its request waits for the new gateway to read the event stream (a 503 would
    stop it for good), then the page shows the task's end. With API keys, as in
    production: the EventSource follows the signed events URL, which the new gateway
    accepts too. A gateway told not to wait (TIMEBOX_HISTORY_WAIT=0) answers 503,
    which closes the EventSource: the page then follows the task's status instead."""
    from playwright.sync_api import expect

    stack: Stack = make_stack(TIMEBOX_API_KEYS="page-key")
    first = stack.gateway()
    stack.worker(1)
    broker_port = free_port()  # the new gateway's broker: nothing listens here yet
    with browser() as chromium:
        page = chromium.new_page()
        page.goto(first.url + "/")
        page.get_by_test_id("api-key").fill("page-key")
        page.get_by_test_id("api-key").press("Tab")  # a change: the task types load
        expect(page.get_by_test_id("task-select")).to_have_value("count_primes")
        types = httpx.get(
            first.url + "/v1/task-types", headers={"Authorization": "Bearer page-key"}
        ).json()
        options = page.get_by_test_id("task-select").locator("option")
        expect(options).to_have_count(len(types))  # loaded once
        page.get_by_test_id("task-input").fill('{"n": 2000000}')
        page.get_by_test_id("submit").click()
        expect(page.get_by_test_id("state")).to_have_text("running", timeout=30_000)
        first.signal(signal.SIGKILL)
        first.stop()
        expect(page.get_by_test_id("link")).to_have_text("reconnecting…", timeout=10_000)
        late = Gateway(
            "gateway-late",
            {
                **stack.env,
                "TIMEBOX_AMQP_URL": url_to_port(amqp_url, broker_port),
                "TIMEBOX_HISTORY_WAIT": "30" if stream_waits else "0",
            },
            stack.log_dir,
            port=first.port,
        )
        stack.gateways.append(late)
        late.wait_for_line("Uvicorn running", 20)
        if stream_waits:
            with httpx.Client(base_url=late.url, timeout=10) as c:
                wait_until(  # the page's EventSource is back, and its request waits
                    lambda: metric(
                        c.get("/metrics").text, "timebox_sse_streams_waiting_for_history"
                    ),
                    30,
                    "the page's EventSource to reconnect",
                )
        else:
            expect(page.get_by_test_id("link")).to_have_text(
                "event stream closed: following the task's status…", timeout=30_000
            )
        proxy = Proxy(urlsplit(amqp_url).port or 5672, listen_port=broker_port)
        try:
            expect(page.get_by_test_id("state")).to_have_text("succeeded", timeout=30_000)
            assert json.loads(page.get_by_test_id("result").inner_text()) == {"count": 148933}
            assert page.get_by_test_id("event-log").inner_text().count("running") == 1
            expect(page.get_by_test_id("link")).to_have_text("")
        finally:
            stack.stop()
            proxy.close()
