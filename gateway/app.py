"""The FastAPI application and its lifespan."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import api, metrics, problems
from gateway.admission import Admission, stop
from gateway.auth import Auth
from gateway.broker import Broker
from gateway.deadletters import DeadLetters
from gateway.eventlog import EventLog
from gateway.limits import BodyLimit
from gateway.services import Services
from gateway.settings import GatewaySettings
from gateway.tasktable import TaskTable
from gateway.watches import Watches

log = logging.getLogger("timebox.gateway")


def create_app(
    settings: GatewaySettings | None = None, *, on_failure: Callable[[str], None] | None = None
) -> FastAPI:
    """The gateway. It serves at once and connects to RabbitMQ in the background; if
    starting fails for another reason than the broker being away, `on_failure` is
    told why (by default the process gets SIGTERM: whatever serves the app stops)."""
    settings = settings or GatewaySettings()
    specs = settings.specs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = Broker(settings, specs)
        table = TaskTable(settings.task_table_size)
        table.listeners.append(metrics.observe)
        eventlog = EventLog(broker, table)
        metrics.BROKER_CONNECTED.set_function(lambda: float(broker.connected and eventlog.reading))
        metrics.TASKS_KNOWN.set_function(lambda: float(len(table)))
        admission = Admission(settings, broker, table, specs)
        watches = Watches(broker, table, settings.stream_grace)
        table.listeners.append(watches.observe)
        metrics.TIED_TASKS.labels("stream").set_function(lambda: float(watches.tied[0]))
        metrics.TIED_TASKS.labels("rpc-elsewhere").set_function(lambda: float(watches.tied[1]))
        services = Services(settings, broker, table, eventlog, admission, Auth(settings), watches)
        app.state.services = services

        async def connected() -> None:
            """Waits for the broker, then reads the event stream and keeps the queue
            figures. Meanwhile the gateway answers: not ready, tasks refused with 503."""
            try:
                await broker.start()
                await eventlog.start()
                await DeadLetters(broker, table).start()
                await watches.start(
                    services.cancel_quietly,
                    # a stopping gateway's clients are on their way to another one
                    lambda: broker.connected and eventlog.reading and not services.stopping.done(),
                )
                log.info("%s ready on namespace %r", broker.name, settings.namespace)
                await admission.run()
            except Exception as exc:  # not the broker away (that is waited for): give up
                log.exception("cannot start")
                (on_failure or _terminate)(f"cannot start: {exc!r}")

        # a server that knows (gateway/__main__.py) calls this as soon as it is told to
        # stop, before it waits for the open requests: those that wait for a task answer
        # at once, and the event streams end, so that clients go on elsewhere
        loop = asyncio.get_running_loop()
        app.state.begin_shutdown = lambda: loop.call_soon_threadsafe(services.begin_shutdown)
        running = asyncio.create_task(connected())
        streams = asyncio.create_task(services.end_streams_on_shutdown())
        try:
            yield
        finally:
            await stop(running)
            await stop(streams)
            await services.background.cancel()
            await watches.close()
            await eventlog.close()
            await broker.close()

    app = FastAPI(
        title="Timebox",
        version="0.1.0",
        description="CPU-heavy tasks behind HTTP, with deadlines enforced at every layer.",
        lifespan=lifespan,
    )
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    api.include(app, specs)
    return app


def _terminate(_why: str) -> None:
    signal.raise_signal(signal.SIGTERM)
