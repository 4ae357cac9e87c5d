"""Test-only task types, loaded by gateways and workers through TIMEBOX_TASK_PLUGINS."""

import os
import signal
from typing import Any

from pydantic import BaseModel, ConfigDict

from compute.context import TaskContext
from contracts.specs import TaskSpec


class ExplodeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = "boom"


class CrashInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    how: str = "kill"  # kill | segfault | exit


class Nothing(BaseModel):
    pass


def explode(inp: ExplodeInput, ctx: TaskContext) -> Nothing:
    raise ValueError(inp.message)


def crash(inp: CrashInput, ctx: TaskContext) -> Nothing:
    if inp.how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif inp.how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
    return Nothing()


SPECS: dict[str, TaskSpec[Any]] = {
    "explode": TaskSpec("explode", "raises ValueError(message)", ExplodeInput, Nothing, {}),
    "crash": TaskSpec("crash", "kills its own process", CrashInput, Nothing, {}),
}
FUNCTIONS = {"explode": explode, "crash": crash}
