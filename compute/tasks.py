"""The demo task functions, one per spec in `contracts.specs`, under the same name."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from math import isqrt
from typing import Any

from pydantic import BaseModel

from compute.context import TaskContext
from contracts.specs import (
    AlignDnaInput,
    AlignDnaOutput,
    BurnCpuInput,
    BurnCpuOutput,
    CountPrimesInput,
    CountPrimesOutput,
    EchoInput,
    EchoOutput,
    ProcessTextInput,
    ProcessTextOutput,
)


def echo(inp: EchoInput, ctx: TaskContext) -> EchoOutput:
    return EchoOutput(payload=inp.payload)


_sum_rate: float | None = None


def _sum_range_rate() -> float:
    """Items per CPU second that `sum(range(n))` gets through on this machine."""
    global _sum_rate
    if _sum_rate is None:
        n = 2_000_000
        start = time.process_time()
        sum(range(n))
        _sum_rate = n / max(time.process_time() - start, 1e-6)
    return _sum_rate


def burn_cpu(inp: BurnCpuInput, ctx: TaskContext) -> BurnCpuOutput:
    start = time.process_time()
    if inp.hold_gil:
        # One C-level call: no bytecode runs until it returns, so no Python signal
        # handler can run either. Only SIGKILL stops it early.
        sum(range(int(inp.seconds * _sum_range_rate())))
    else:
        while (spent := time.process_time() - start) < inp.seconds:
            for _ in range(20_000):
                pass
            ctx.progress(spent / inp.seconds)
    return BurnCpuOutput(seconds=round(time.process_time() - start, 4))


def count_primes(inp: CountPrimesInput, ctx: TaskContext) -> CountPrimesOutput:
    n = inp.n
    divisors: list[int] = []
    keep_below = isqrt(n) + 1
    count = 0
    step = max(1, n // 100)
    next_report = step
    for k in range(2, n):
        if k >= next_report:
            ctx.progress(k / n)
            next_report += step
        root = isqrt(k)
        is_prime = True
        for p in divisors:
            if p > root:
                break
            if k % p == 0:
                is_prime = False
                break
        if is_prime:
            count += 1
            if k < keep_below:
                divisors.append(k)
    return CountPrimesOutput(count=count)


def process_text(inp: ProcessTextInput, ctx: TaskContext) -> ProcessTextOutput:
    text = inp.text
    words: list[str] = []
    current: list[str] = []
    step = max(1, len(text) // 20)
    for i, ch in enumerate(text):
        if i % step == 0:
            ctx.progress(i / max(1, len(text)))
        if ch.isspace():
            if current:
                words.append("".join(current).lower())
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current).lower())
    return ProcessTextOutput(text=" ".join(words), words=len(words))


def align_dna(inp: AlignDnaInput, ctx: TaskContext) -> AlignDnaOutput:
    a, b = inp.a, inp.b
    prev = [-j for j in range(len(b) + 1)]
    step = max(1, len(a) // 50)
    for i in range(1, len(a) + 1):
        if i % step == 0:
            ctx.progress(i / len(a))
        ai = a[i - 1]
        cur = [-i] + [0] * len(b)
        left = -i
        for j in range(1, len(b) + 1):
            diag = prev[j - 1] + (1 if ai == b[j - 1] else -1)
            up = prev[j] - 1
            left = max(diag, up, left - 1)
            cur[j] = left
        prev = cur
    return AlignDnaOutput(score=prev[-1])


TaskFunction = Callable[[Any, TaskContext], BaseModel]

FUNCTIONS: dict[str, TaskFunction] = {
    "echo": echo,
    "burn_cpu": burn_cpu,
    "count_primes": count_primes,
    "process_text": process_text,
    "align_dna": align_dna,
}


def load_functions(plugins: Iterable[str] = ()) -> dict[str, TaskFunction]:
    """The demo functions plus those of each plugin module (its `FUNCTIONS` dict)."""
    functions = dict(FUNCTIONS)
    for name in plugins:
        functions.update(importlib.import_module(name).FUNCTIONS)
    return functions
