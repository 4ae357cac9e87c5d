"""Child processes that run tasks: one per slot, plus a warm spare so a slot whose
child was killed is ready again at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

from compute.child import NICE_ENV, PARENT_ENV

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROTOCOL_LIMIT = 256 * 1024 * 1024  # one result line may be large (process_text)


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of a live or zombie process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.broken = False

    @classmethod
    async def spawn(cls, nice: int = 0) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "compute.child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, PARENT_ENV: str(os.getpid()), NICE_ENV: str(nice)},
            limit=PROTOCOL_LIMIT,
        )
        child = cls(proc)
        hello = await child.receive()
        if hello is None or hello.get("kind") != "ready":
            await child.stop(0.1)
            raise RuntimeError(f"task child process did not start: {hello!r}")
        return child

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.broken

    def discard(self) -> None:
        """Kills the child at once; the pool replaces it when it is released."""
        self.broken = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def cpu(self) -> float:
        return cpu_seconds_of(self.pid) or 0.0

    async def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        await self.proc.stdin.drain()

    async def receive(self) -> dict[str, Any] | None:
        """The next protocol message; None when the child has died."""
        assert self.proc.stdout is not None
        try:
            line = await self.proc.stdout.readline()
        except (ValueError, ConnectionError):
            return None
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self, grace: float) -> float:
        """SIGTERM, then SIGKILL after `grace`; returns the CPU seconds it had used."""
        cpu = self.cpu()
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                cpu = self.cpu()
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return cpu


class Pool:
    """`size` idle-or-busy children and one warm spare."""

    def __init__(self, size: int, nice: int = 0) -> None:
        self.size = size
        self.nice = nice
        self._idle: asyncio.Queue[Child] = asyncio.Queue()
        self._spare: asyncio.Task[Child] | None = None
        self._all: set[Child] = set()

    async def start(self) -> None:
        children = await asyncio.gather(*(Child.spawn(self.nice) for _ in range(self.size)))
        for child in children:
            self._all.add(child)
            self._idle.put_nowait(child)
        self._spare = asyncio.create_task(Child.spawn(self.nice))

    async def acquire(self) -> Child:
        return await self._idle.get()

    def release(self, child: Child) -> None:
        if child.alive:
            self._idle.put_nowait(child)
        else:
            asyncio.get_running_loop().create_task(self.replace(child))

    async def replace(self, dead: Child) -> None:
        """Puts the warm spare in the dead child's place and warms a new spare."""
        self._all.discard(dead)
        spare = self._spare
        self._spare = asyncio.create_task(Child.spawn(self.nice))
        try:
            child = await spare if spare is not None else await Child.spawn(self.nice)
        except Exception:
            child = await Child.spawn(self.nice)
        self._all.add(child)
        self._idle.put_nowait(child)

    def pids(self) -> list[int]:
        pids = [c.pid for c in self._all]
        if self._spare is not None and self._spare.done() and not self._spare.exception():
            pids.append(self._spare.result().pid)
        return pids

    async def close(self, grace: float = 0.5) -> None:
        spare = self._spare
        if spare is not None:
            spare.cancel()
            with contextlib.suppress(BaseException):
                self._all.add(await spare)
        await asyncio.gather(*(c.stop(grace) for c in self._all), return_exceptions=True)
        self._all.clear()
