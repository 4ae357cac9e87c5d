"""Timebox in a user's own code: a task module outside this repository served by the
two programs started as a user starts them, and a FastAPI app of the user's own that
calls tasks from its endpoints."""

from __future__ import annotations

import itertools
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.harness import Proc, free_port, tree_cpu, wait_until

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent


class App(Proc):
    """A user's FastAPI app under uvicorn, as `uvicorn module:app` runs it."""

    def __init__(self, name: str, target: str, env: dict[str, str], stack: Stack, cwd: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [str(BIN / "uvicorn"), target, "--port", str(self.port), "--app-dir", str(cwd)]
        super().__init__(name, args, {**stack.env, **env}, stack.log_dir, cwd)
        self.wait_for_line("Application startup complete", 30)

    def wait_hears(self, worker: str, prefix: str = "") -> None:
        def heard() -> bool:
            workers = httpx.get(f"{self.url}{prefix}/v1/workers", timeout=2).json()
            return any(w["worker"] == worker for w in workers)

        wait_until(heard, 20, f"{self.name} to hear of {worker}")


def write(folder: Path, name: str, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


SHOP = """
    import os
    from typing import Annotated

    from pydantic import BaseModel, Field

    import timebox


    class Item(BaseModel):
        name: str
        cents: Annotated[int, Field(ge=0)]


    class Price(BaseModel):
        cents: int
        ran_in: int


    @timebox.task(cost=lambda items: len(items), example={"items": [{"name": "a", "cents": 1}]})
    def price(
        items: Annotated[list[Item], Field(max_length=100)],
        discount: Annotated[float, Field(ge=0, le=1)] = 0.0,
    ) -> Price:
        \"\"\"The price of a basket.\"\"\"
        total = sum(item.cents for item in items)
        return Price(cents=round(total * (1 - discount)), ran_in=os.getpid())


    @timebox.task(queue="elsewhere")
    def unserved(n: int) -> int:
        return n
"""


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Path]:
    """A user's task module in a folder of their own, outside this repository."""
    folder = tmp_path / "shop"
    write(folder, "shop_tasks", SHOP)
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("shop_tasks", None)


def programs(
    stack: Stack, gateway_in: Path, worker_in: Path, *worker_args: str
) -> tuple[str, Proc, Proc]:
    """`timebox-gateway shop_tasks` and `timebox-worker shop_tasks`, each run from a
    folder of its own as a user runs them: the gateway's URL and both processes."""
    stack.task_queues.append("elsewhere")  # shop_tasks routes `unserved` there
    port = free_port()
    args = (str(BIN / "timebox-gateway"), "shop_tasks", "--port", str(port))
    gateway = Proc("gateway", list(args), stack.env, stack.log_dir, cwd=gateway_in)
    args = (str(BIN / "timebox-worker"), "shop_tasks", "--concurrency", "1", *worker_args)
    worker = Proc("worker", list(args), stack.env, stack.log_dir, cwd=worker_in)
    return f"http://127.0.0.1:{port}", gateway, worker


def test_a_module_of_your_own_is_served_by_the_two_programs_started_as_you_would(
    make_stack, shop: Path, tmp_path: Path
) -> None:
    from timebox_client import Client, NoWorker

    stack: Stack = make_stack()
    url, gateway, worker = programs(stack, shop, shop, "--queues", "default")
    try:
        worker_name = worker.wait_for_line(r"worker \S+ ready", 30).split("worker ")[1].split()[0]

        def hears() -> bool:
            with httpx.Client(base_url=url, timeout=2) as c:
                return any(w["worker"] == worker_name for w in c.get("/v1/workers").json())

        wait_until(lambda: _answers(url) and hears(), 30, "the gateway to hear the worker")
        with httpx.Client(base_url=url, timeout=30) as c:
            types = {t["name"]: t for t in c.get("/v1/task-types").json()}
            assert set(types) == {"price", "unserved"}  # only the module's: no demo task
            assert types["price"]["description"] == "The price of a basket."
            assert types["price"]["limits"] == {
                "items": {"maxItems": 100},
                "discount": {"minimum": 0, "maximum": 1},
            }
            basket = {"items": [{"name": "tea", "cents": 250}, {"name": "cake", "cents": 350}]}
            answer = c.post("/v1/tasks/price?wait=true", json=basket | {"discount": 0.5})
            assert answer.status_code == 200, answer.text
            assert answer.json()["result"]["cents"] == 300
            assert c.post("/v1/tasks/price", json=basket | {"discount": 2}).status_code == 422
            # a type no worker serves is refused at once, not queued to expire
            refused = c.post("/v1/tasks/unserved", json={"n": 1})
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert int(refused.headers["retry-after"]) >= 1
            assert "unserved" in refused.json()["detail"]
        # the typed client takes the decorated function and gives its return type
        from shop_tasks import Item, Price, price, unserved

        with Client(url) as tb:
            got = tb.call(price, items=[Item(name="tea", cents=100)], request_timeout=10)
            assert isinstance(got, Price)
            assert got.cents == 100
            # the task ran in one of the worker's children: not in either program
            assert got.ran_in not in (gateway.pid, worker.pid)
            with pytest.raises(NoWorker):
                tb.call(unserved, n=1, request_timeout=10)
    finally:
        worker.stop()
        gateway.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_worker_running_other_code_for_a_task_type_is_told_once(
    make_stack, shop: Path, tmp_path: Path
) -> None:
    """A deploy where the two programs run different versions of a task module."""
    other = tmp_path / "other"
    write(other, "shop_tasks", SHOP.replace("le=1)]", "le=0.5)]"))
    stack: Stack = make_stack()
    url, gateway, worker = programs(stack, shop, other, "--queues", "default")
    try:
        line = gateway.wait_for_line(r"serves price with another input schema", 30)
        assert "different code" in line
        name = worker.wait_for_line(r"worker \S+ ready").split("worker ")[1].split()[0]
        heard: list[float] = []

        def announced_again() -> bool:  # the worker announces itself every few seconds
            workers = httpx.get(f"{url}/v1/workers", timeout=2).json()
            heard.extend(w["last_heard"] for w in workers if w["worker"] == name)
            return sum(1 for a, b in itertools.pairwise(heard) if b < a) >= 2

        wait_until(announced_again, 20, "two more announcements")
        assert gateway.count(r"serves price with another input schema") == 1
        assert gateway.count(r"serves unserved with another input schema") == 0
    finally:
        worker.stop()
        gateway.stop()


OWN_APP = """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request

    import timebox


    @timebox.task
    def double(n: int) -> int:
        return 2 * n


    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.mine = "started"
        yield


    app = FastAPI(lifespan=lifespan)
    timebox.attach(app, double, prefix="/timebox")


    @app.get("/mine")
    async def mine(request: Request) -> str:
        return request.app.state.mine


    @app.get("/double")
    async def doubled(call: timebox.Call, n: int) -> int:
        return await call(double, n=n)
"""


def test_your_own_app_keeps_its_lifespan_and_serves_the_routes_under_a_prefix(
    make_stack, tmp_path: Path
) -> None:
    folder = tmp_path / "own"
    write(folder, "own_app", OWN_APP)
    stack: Stack = make_stack()
    app = App("app", "own_app:app", {}, stack, folder)
    worker = stack.worker(1, "own_app", "--app-dir", str(folder))
    try:
        app.wait_hears(worker.status_name, prefix="/timebox")
        with httpx.Client(base_url=app.url, timeout=30) as c:
            assert c.get("/mine").json() == "started"  # its own lifespan ran too
            assert c.get("/double", params={"n": 21}).json() == 42
            bad = c.get("/double", params={"n": "x"})
            assert bad.status_code == 422  # the app's own validation, in its own format
            assert "detail" in bad.json()
            types = c.get("/timebox/v1/task-types").json()
            assert [t["name"] for t in types] == ["double"]
            queued = c.post("/timebox/v1/tasks/double", json={"n": 2})
            assert queued.status_code == 202
            assert queued.headers["location"] == f"/timebox/v1/tasks/{queued.json()['id']}"
            assert queued.json()["events_url"].startswith("/timebox/v1/tasks/")
            invalid = c.post("/timebox/v1/tasks/double", json={"n": "x"})
            assert invalid.status_code == 422
            assert invalid.headers["content-type"] == "application/problem+json"
            assert c.get("/v1/task-types").status_code == 404  # nothing outside the prefix
    finally:
        app.stop()


def test_do_something_answers_or_gives_up_at_the_deadline_and_stops_the_work(
    make_stack,
) -> None:
    """The first seed's scenario with a 2 s deadline: the client gets a 504 problem at
    its deadline, the app logs in its own words that the work was stopped, no CPU is
    spent after, other requests are answered meanwhile, and a client that goes away
    has its work stopped too."""
    stack: Stack = make_stack()
    repo = Path(__file__).parent.parent
    app = App("do_something", "examples.do_something:app", {}, stack, repo)
    try:
        with httpx.Client(base_url=app.url, timeout=30) as c:
            refused = c.get("/do_something", params={"seconds": 1})  # no worker yet
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert "retry-after" in refused.headers
        worker = stack.worker(2, "examples.do_something")
        app.wait_hears(worker.status_name)
        with httpx.Client(base_url=app.url, timeout=30) as c:
            answers: list[httpx.Response] = []

            def meanwhile() -> None:
                time.sleep(0.3)
                answers.append(c.get("/do_something", params={"seconds": 0.2}))
                answers.append(c.get("/openapi.json"))

            other = threading.Thread(target=meanwhile)
            other.start()
            started = time.monotonic()
            stopped = c.get(
                "/do_something", params={"seconds": 30}, headers={"Request-Timeout": "2"}
            )
            took = time.monotonic() - started
            other.join()
            assert stopped.status_code == 504
            assert stopped.headers["content-type"] == "application/problem+json"
            assert stopped.json()["type"] == "/problems/task-aborted"
            assert 1.5 < took < 2.5, took
            assert [a.status_code for a in answers] == [200, 200]
            assert answers[0].json()["cpu_seconds"] == pytest.approx(0.2, abs=0.15)
            line = app.wait_for_line(r"do_something: stopped crunch \S+ at the client's deadline")
            assert stopped.json()["task"]["id"] in line
            ran, cpu = (float(x) for x in _numbers_after(line, "after"))
            assert 1.0 < ran < 2.0, line
            assert 0.5 < cpu < 2.0, line
            # nothing burns after the answer
            after = tree_cpu(worker.pid, include_root=False)
            time.sleep(1.0)
            assert tree_cpu(worker.pid, include_root=False) - after < 0.2
            # a client that gives up before the deadline has its work stopped too
            with pytest.raises(httpx.ReadTimeout):
                c.get("/do_something", params={"seconds": 30}, timeout=1.0)
            worker.wait_for_line(r"cancelled crunch \S+: cancelled while running", 10)
    finally:
        app.stop()


def _numbers_after(line: str, word: str) -> list[str]:
    import re

    return re.findall(r"(\d+\.\d+)", line.split(word, 1)[1])[:2]
