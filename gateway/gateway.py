"""The gateway inside a FastAPI app: `attach(app, *tasks)` adds its lifespan to the
app's (connecting to RabbitMQ, reading the event stream), its `/v1` routes under a
prefix, and problem+json answers for the errors its calls raise. The standalone
gateway (gateway/app.py) is such an app; so is yours."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from contracts.errors import BrokerUnavailable, TimeboxError
from contracts.tasks import Task, load_tasks, routes
from gateway import metrics, problems
from gateway.accounting import Ledger
from gateway.admission import Admission, stop
from gateway.auth import Auth
from gateway.broker import Broker
from gateway.clients import Clients
from gateway.console import Activity
from gateway.deadletters import DeadLetters
from gateway.eventlog import EventLog
from gateway.fleet import Fleet
from gateway.parked import Parked
from gateway.services import Services
from gateway.settings import GatewaySettings
from gateway.sse import Fanout
from gateway.tasktable import TaskTable
from runtime import tracing

log = logging.getLogger("timebox.gateway")


class Gateway:
    """Timebox's gateway for one app: its tasks, settings, and (while the app runs)
    the services its routes and calls share."""

    def __init__(
        self,
        tasks: dict[str, Task[..., Any]],
        settings: GatewaySettings | None = None,
        *,
        prefix: str = "",
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.tasks = tasks
        self._settings = settings
        self.prefix = prefix.rstrip("/")
        self.on_failure = on_failure or _terminate
        self._services: Services | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def settings(self) -> GatewaySettings:
        if self._settings is None:  # read when the app starts, not when it is imported
            self._settings = GatewaySettings()
        return self._settings

    @property
    def services(self) -> Services:
        if self._services is None:
            raise BrokerUnavailable("the gateway is starting; retry shortly", retry_after=1)
        return self._services

    def path(self, tail: str) -> str:
        """A path of the gateway's API, under its prefix."""
        return f"{self.prefix}{tail}"

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Serves at once and connects to RabbitMQ in the background; if starting fails
        for another reason than the broker being away, `on_failure` is told why (by
        default the process gets SIGTERM: whatever serves the app stops)."""
        settings = self.settings
        tracing.configure("timebox-gateway")
        broker = Broker(settings, routes(self.tasks.values()))
        table = TaskTable(settings.task_table_size)
        table.listeners.append(metrics.observe)
        fleet = Fleet(self.tasks, settings.clock_skew)
        eventlog = EventLog(broker, table, fleet)
        metrics.BROKER_CONNECTED.set_function(lambda: float(broker.connected and eventlog.reading))
        metrics.TASKS_KNOWN.set_function(lambda: float(len(table)))
        admission = Admission(settings, broker, table, fleet)
        ledger, activity = Ledger(admission.expect), Activity()
        table.listeners += [ledger, activity]
        clients = Clients(broker, settings.stream_grace)
        metrics.CLIENTS.set_function(lambda: float(clients.followed))
        table.fanout = fanout = Fanout()
        services = Services(
            settings,
            self.tasks,
            fleet,
            broker,
            table,
            eventlog,
            admission,
            Auth(settings),
            clients,
            fanout,
            Parked(broker),
            ledger,
            activity,
        )
        self._services = services
        self._loop = asyncio.get_running_loop()

        async def connected() -> None:
            """Waits for the broker, then reads the event stream and keeps the queue
            figures. Meanwhile the gateway answers: not ready, tasks refused with 503."""
            try:
                await broker.start()
                await eventlog.start()
                await DeadLetters(broker, table).start()
                clients.start()
                log.info("%s ready on namespace %r", broker.name, settings.namespace)
                await admission.run()
            except Exception as exc:  # not the broker away (that is waited for): give up
                log.exception("cannot start")
                self.on_failure(f"cannot start: {exc!r}")

        running = asyncio.create_task(connected())
        streams = asyncio.create_task(services.end_streams_on_shutdown())
        try:
            yield
        finally:
            await stop(running)
            await stop(streams)
            await services.background.cancel()
            await clients.close()
            await eventlog.close()
            await broker.close()
            self._services = None

    def begin_shutdown(self) -> None:
        """The server is told to stop: waiting RPCs answer at once and event streams end,
        so that clients go on elsewhere (gateway/__main__.py calls it at the signal,
        from any thread)."""
        if self._services is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._services.begin_shutdown)


def attach(
    app: FastAPI,
    *tasks: Task[..., Any] | str,
    prefix: str = "",
    api: bool = True,
    settings: GatewaySettings | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> Gateway:
    """Adds Timebox to a FastAPI app: `tasks` (decorated functions, or modules that
    declare them) become callable from its endpoints through `timebox.Call`, and with
    `api` the gateway's `/v1` routes are served under `prefix`. Its lifespan runs
    within the app's; settings come from the environment (TIMEBOX_*) unless given."""
    from gateway.api import build_router

    found: dict[str, Task[..., Any]] = {}
    for item in tasks:
        for declared in load_tasks([item]).values() if isinstance(item, str) else [item]:
            if found.setdefault(declared.name, declared) is not declared:
                raise LookupError(f"two tasks are named {declared.name!r}")
    if not found:
        raise LookupError("timebox.attach: name at least one task, or a module of tasks")
    gateway = Gateway(found, settings, prefix=prefix, on_failure=on_failure)
    app.state.timebox = gateway
    router = build_router(gateway) if api else APIRouter(lifespan=gateway.lifespan)
    app.include_router(router, prefix=gateway.prefix)
    app.add_exception_handler(TimeboxError, _problem)
    return gateway


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TimeboxError)
    return problems.from_error(exc)


def _terminate(_why: str) -> None:
    signal.raise_signal(signal.SIGTERM)
