"""Test-only task types, loaded by gateways and workers through TIMEBOX_TASK_PLUGINS."""

import os
import signal
import subprocess
import sys
import time
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


class NapInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float


class ChattyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: int = 100
    size: int = 1000


def kill_parent(inp: Nothing, ctx: TaskContext) -> Nothing:
    """Kills the worker that runs it (its parent is the worker's fork server): a poison
    message."""
    with open(f"/proc/{os.getppid()}/stat") as f:
        worker = int(f.read().rsplit(")", 1)[1].split()[1])
    os.kill(worker, signal.SIGKILL)
    return Nothing()


def nap(inp: NapInput, ctx: TaskContext) -> Nothing:
    """Sleeps: a run time of the caller's choosing that no cost hint predicts."""
    time.sleep(inp.seconds)
    return Nothing()


def chatty(inp: ChattyInput, ctx: TaskContext) -> Nothing:
    """Sends many large progress events, unthrottled."""
    filler = "x" * inp.size
    for i in range(inp.events):
        ctx._sink(i / inp.events, filler)
    return Nothing()


class SpawnInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ignore_term: bool = False  # the task itself survives SIGTERM (only SIGKILL ends it)
    new_session: bool = False  # the program leaves the task's process group (setsid)


def spawn(inp: SpawnInput, ctx: TaskContext) -> Nothing:
    """Starts a process that burns CPU and ignores SIGTERM, says its pid, and waits:
    what a task that runs an external program leaves behind when it is killed."""
    burner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
        ],
        start_new_session=inp.new_session,
    )
    ctx._sink(0.5, f"pid {burner.pid}")  # at once: progress() holds early reports back
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:
            if not inp.ignore_term:
                raise
    return Nothing()


SPECS: dict[str, TaskSpec[Any]] = {
    "explode": TaskSpec("explode", "raises ValueError(message)", ExplodeInput, Nothing, {}),
    "crash": TaskSpec("crash", "kills its own process", CrashInput, Nothing, {}),
    "kill_parent": TaskSpec("kill_parent", "kills its worker", Nothing, Nothing, {}),
    "chatty": TaskSpec("chatty", "floods progress events", ChattyInput, Nothing, {}),
    "nap": TaskSpec("nap", "sleeps, with no cost hint", NapInput, Nothing, {}),
    "spawn": TaskSpec("spawn", "starts a CPU-burning process", SpawnInput, Nothing, {}),
}
FUNCTIONS = {
    "explode": explode,
    "crash": crash,
    "kill_parent": kill_parent,
    "chatty": chatty,
    "nap": nap,
    "spawn": spawn,
}
