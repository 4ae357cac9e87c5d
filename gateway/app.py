"""The FastAPI application and its lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
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

log = logging.getLogger("timebox.gateway")


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    specs = settings.specs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = Broker(settings, specs)
        await broker.start()
        table = TaskTable(settings.task_table_size)
        table.listeners.append(metrics.observe)
        eventlog = EventLog(broker, table)
        metrics.BROKER_CONNECTED.set_function(lambda: float(broker.connected and eventlog.reading))
        metrics.TASKS_KNOWN.set_function(lambda: float(len(table)))
        admission = Admission(settings, broker, table, specs)
        app.state.services = Services(settings, broker, table, eventlog, admission, Auth(settings))
        await eventlog.start()
        await DeadLetters(broker, table).start()
        figures = asyncio.create_task(admission.run())
        streams = asyncio.create_task(app.state.services.end_streams_on_shutdown())
        log.info("%s ready on namespace %r", broker.name, settings.namespace)
        try:
            yield
        finally:
            await stop(figures)
            await stop(streams)
            await app.state.services.background.cancel()
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
