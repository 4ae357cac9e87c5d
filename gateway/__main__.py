"""`timebox-gateway MODULE...` / `python -m gateway MODULE...`: uvicorn serving the
gateway for the @timebox.task functions of those modules."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import traceback
from types import FrameType

import uvicorn
from pydantic import ValidationError

from contracts.tasks import load_tasks, module_names
from gateway.app import create_app
from gateway.gateway import Gateway
from gateway.settings import GatewaySettings
from runtime.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="timebox-gateway", description=__doc__)
    parser.add_argument(
        "modules", nargs="*", metavar="MODULE", help="task modules (default: TIMEBOX_TASK_MODULES)"
    )
    parser.add_argument("--host", default=None, help="default 127.0.0.1 (TIMEBOX_HOST)")
    parser.add_argument("--port", type=int, default=None, help="default 8000 (TIMEBOX_PORT)")
    parser.add_argument(
        "--app-dir", default=".", help="where the modules are found first (default: .)"
    )
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        sys.exit(f"timebox-gateway: invalid settings:\n{exc}")
    modules = args.modules or module_names(settings.task_modules)
    if not modules:
        sys.exit(
            "timebox-gateway: no task modules: name them (timebox-gateway my.tasks) "
            "or set TIMEBOX_TASK_MODULES"
        )
    sys.path.insert(0, args.app_dir)  # as uvicorn does: the modules of the folder it runs in
    try:
        tasks = load_tasks(modules)
    except Exception:
        sys.exit(f"timebox-gateway: cannot load the task modules:\n{traceback.format_exc()}")
    configure_logging(settings.log_format)
    tune_gc()
    server: uvicorn.Server
    failures: list[str] = []

    def give_up(why: str) -> None:
        failures.append(why)
        server.should_exit = True

    app = create_app(tasks, settings, on_failure=give_up)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, app.state.timebox)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if failures:
        sys.exit(f"timebox-gateway: {failures[0]}")
    if not server.started:  # as uvicorn.run: the port taken, say
        sys.exit(3)


class _Server(uvicorn.Server):
    """Tells the gateway at once when a signal asks it to stop (gateway/gateway.py)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.gateway.begin_shutdown()


def tune_gc() -> None:
    """A gateway holds many long-lived objects (SSE streams, its task table): a larger
    young generation lets fewer of them survive into the old ones, and what was loaded
    at startup is left out of every collection, so that no full collection pauses the
    loop for long (docs/performance.md, SSE fan-out)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 2, 100)


if __name__ == "__main__":
    main()
