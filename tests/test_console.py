"""The operations console: what it keeps from the events (gateway/console.py,
gateway/accounting.py), and the page at /console in Chromium with API keys on."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import httpx
import pytest

from contracts.events import EventType, TaskEvent
from gateway.accounting import HOUR, Ledger
from gateway.auth import owner_of
from gateway.console import Activity
from gateway.tasktable import Record, TaskTable
from tests.conftest import Stack
from tests.harness import browser, metric, wait_until

pytestmark = pytest.mark.timeout(120)
OPS, OTHER = {"Authorization": "Bearer ops-key"}, {"Authorization": "Bearer other-key"}


def table_with(
    listener: Callable[[Record, TaskEvent], None], *tasks: tuple[str, str | None, float]
) -> TaskTable:
    """A table, told to `listener`, that has read the `queued` of each (task id, owner,
    seconds left)."""
    table, events = TaskTable(100), []
    table.listeners.append(listener)
    for task_id, owner, left in tasks:
        event = TaskEvent(
            type=EventType.QUEUED,
            task_id=task_id,
            task="resize",
            owner=owner,
            deadline_ms=round((time.time() + left) * 1000),
            cost=1.0,
        )
        table.apply(len(events), event)
        events.append(event)
    return table


def test_the_ledger_keeps_each_owners_cpu_by_use_and_by_minute_for_an_hour() -> None:
    ledger = Ledger(lambda task, cost: 0.5)
    table = table_with(ledger, ("a1", "alice", 30), ("a2", "alice", 30), ("b1", "bob", 30))
    now = time.time()
    hour_ago = now - 3600
    table.apply(
        10,
        TaskEvent(type=EventType.SUCCEEDED, task_id="a1", task="resize", ran=1.0, cpu_seconds=0.9),
    )
    table.apply(
        11, TaskEvent(type=EventType.ABORTED, task_id="b1", task="resize", ran=2.0, cpu_seconds=1.9)
    )
    table.apply(12, TaskEvent(type=EventType.EXPIRED, task_id="a2", task="resize", reason="late"))
    ledger.refused("alice", "resize", "overloaded", 1.0)
    # an ending read late lands in its own minute; one older than the hour only in the totals
    ledger._book("alice", "wasted", "late", 0.25, now - 120)
    ledger._book("alice", "wasted", "late", 7.0, hour_ago - 60)

    alice = ledger.view("alice", now)
    assert alice["totals"] == {"delivered": 0.9, "wasted": 7.25, "saved": 1.0}
    assert alice["reasons"]["saved"] == {"expired": 0.5, "overloaded": 0.5}
    minutes = alice["minutes"]
    assert len(minutes) == HOUR
    assert minutes[-1][0] == now // 60 * 60
    assert minutes[0][0] > hour_ago - 60
    assert minutes[-1][1:] == [0.9, 0.0, 1.0]
    assert minutes[-3][1:] == [0.0, 0.25, 0.0]
    assert sum(m[2] for m in minutes) == 0.25
    assert ledger.view("bob", now)["totals"] == {"delivered": 0.0, "wasted": 1.9, "saved": 0.0}
    assert ledger.view(None, now)["totals"] == {"delivered": 0.0, "wasted": 0.0, "saved": 0.0}


def test_activity_shows_an_owner_its_tasks_the_most_urgent_first() -> None:
    activity = Activity()
    table = table_with(activity, ("late", "alice", 50), ("soon", "alice", 5), ("bobs", "bob", 1))
    table.apply(
        5, TaskEvent(type=EventType.RUNNING, task_id="soon", task="resize", start=time.time())
    )
    table.apply(
        6, TaskEvent(type=EventType.RUNNING, task_id="late", task="resize", start=time.time())
    )
    table.apply(7, TaskEvent(type=EventType.SUCCEEDED, task_id="late", task="resize", ran=0.1))
    now = time.time()
    assert [r.status.id for r in activity.running("alice", now)] == ["soon"]
    assert [r.status.id for r in activity.running("bob", now)] == ["bobs"]
    assert [r.status.id for r in activity.latest_ended("alice")] == ["late"]
    assert activity.latest_ended("bob") == []
    assert activity.states(now) == {("resize", "running"): 1, ("resize", "queued"): 1}
    activity.refused("resize")
    endings, refused = activity.per_minute(now)
    assert endings == {("resize", "succeeded"): 1}
    assert refused == {"resize": 1}
    # a minute on, they are no longer "per minute"; a task never heard of again after
    # its deadline is no longer shown running
    assert activity.per_minute(now + 61) == ({}, {})
    assert activity.running("alice", now + 5 + 61) == []
    assert activity.states(now + 5 + 61) == {}


def _park(stack: Stack, message_id: str, owner: str) -> None:
    """A message the worker parks at once: its body is not JSON."""

    async def publish() -> None:
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            headers = {"x-owner": owner, "x-deadline": int(time.time() * 1000) + 60_000}
            message = aio_pika.Message(
                b"{{{ nope", message_id=message_id, headers=headers, type="echo"
            )
            await channel.default_exchange.publish(message, f"{stack.namespace}.tasks.default")

    asyncio.run(publish())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_the_console_shows_a_keys_tasks_and_the_fleet_live_and_cancels(
    make_stack, tmp_path: Path
) -> None:
    """With API keys: the console asks for one, then shows the fleet's task types and
    workers as the API does, the key's tasks only, where their CPU went, its parked
    messages; a task found by id, and one cancelled from the page, which ends. At a
    laptop's and a phone's width."""
    from playwright.sync_api import expect

    stack: Stack = make_stack(TIMEBOX_API_KEYS="ops-key,other-key")
    stack.gateway()
    stack.worker(3)
    with stack.client() as c:

        def post(task: str, body: dict[str, object], headers: dict[str, str]) -> str:
            r = c.post(f"/v1/tasks/{task}", json=body, headers=headers)
            assert r.status_code in (200, 202), r.text
            return str(r.json()["id"])

        done = post("count_primes", {"n": 20_000}, {**OPS, "Prefer": "wait"})
        theirs = post("nap", {"seconds": 60}, OTHER)
        long = post("burn_cpu", {"seconds": 60}, OPS)
        _park(stack, f"parked-{long}", owner_of("ops-key"))  # before Playwright's loop starts
    with stack.client() as c, browser() as chromium:
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.goto(stack.url + "/console")
        expect(page.get_by_test_id("link")).to_have_text("enter your API key")
        page.get_by_test_id("api-key").fill("ops-key")
        page.get_by_test_id("api-key").press("Tab")
        expect(page.get_by_test_id("link")).to_have_text("live")
        running = page.get_by_test_id(f"running-{long}")
        expect(running).to_contain_text("running", timeout=20_000)
        expect(page.get_by_test_id(f"ended-{done}")).to_contain_text("succeeded")
        assert page.get_by_test_id(f"running-{theirs}").count() == 0  # another key's

        # the figures are the API's
        for figures in c.get("/v1/queues", headers=OPS).json():
            row = page.get_by_test_id(f"type-{figures['task']}").locator("td")
            expect(row.nth(4)).to_have_text(str(figures["parallel_slots"]))
            expect(row.nth(5)).to_have_text(str(figures["workers"]))
        expect(page.get_by_test_id("type-burn_cpu").locator("td").nth(3)).to_have_text("1")
        expect(page.get_by_test_id("type-nap").locator("td").nth(3)).to_have_text("1")
        (listed,) = c.get("/v1/workers", headers=OPS).json()
        expect(page.get_by_test_id(f"worker-{listed['worker']}")).to_contain_text(
            f"{listed['busy']} / {listed['slots']}"
        )
        delivered = metric(
            c.get("/metrics").text, "timebox_fleet_cpu_seconds_total", use="delivered"
        )
        assert delivered > 0
        expect(page.get_by_test_id("cpu-delivered")).to_have_attribute(
            "data-value", str(round(delivered, 3))
        )
        page.get_by_test_id("search").fill(done)
        page.get_by_test_id("find").click()
        expect(page.get_by_test_id("found")).to_contain_text("succeeded")
        wait_until(
            lambda: any(
                m["id"] == f"parked-{long}" for m in c.get("/v1/parked", headers=OPS).json()
            ),
            20,
            "the message to be parked",
        )
        page.get_by_role("button", name="refresh").click()
        expect(page.get_by_test_id(f"parked-parked-{long}")).to_contain_text("Invalid JSON")

        shots = {}
        for name, width in {"wide": 1280, "phone": 390}.items():
            page.set_viewport_size({"width": width, "height": 900})
            expect(running).to_be_visible()
            # nothing wider than the screen but the tables, which scroll in their boxes
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            assert page.locator("#chart canvas").bounding_box()["width"] <= width  # type: ignore[index]
            shots[name] = tmp_path / f"console-{name}.png"
            page.screenshot(path=shots[name], full_page=True)
        page.get_by_test_id(f"cancel-{long}").click()
        ended = page.get_by_test_id(f"ended-{long}")
        expect(ended).to_contain_text("cancelled", timeout=20_000)
        assert c.get(f"/v1/tasks/{long}", headers=OPS).json()["state"] == "cancelled"
        assert running.count() == 0
        wasted = httpx.get(stack.url + "/v1/console", headers=OPS).json()["cpu"]["totals"]["wasted"]
        assert wasted > 0
        expect(page.get_by_test_id("cpu-wasted")).to_have_attribute("data-value", str(wasted))
