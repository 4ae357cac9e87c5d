"""The demo tasks: real CPU work whose run time grows with its input, so deadlines,
admission, aborts and fairness can be shown and measured.

    timebox-gateway examples.tasks
    timebox-worker examples.tasks
"""

from __future__ import annotations

import math
import time
from typing import Annotated

from pydantic import BaseModel, Field, JsonValue, StringConstraints

import timebox


class Echoed(BaseModel):
    payload: JsonValue


@timebox.task(example={"payload": {"hello": "world"}})
def echo(payload: JsonValue) -> Echoed:
    """Returns its payload: measures the system's own overhead."""
    return Echoed(payload=payload)


class Burned(BaseModel):
    seconds: float


@timebox.task(cost=lambda seconds: seconds, example={"seconds": 3, "hold_gil": False})
def burn_cpu(
    ctx: timebox.TaskContext,
    seconds: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)],
    hold_gil: bool = False,
) -> Burned:
    """Keeps one core busy for about `seconds` of CPU, reporting progress. With
    `hold_gil` the work is one long C call that never returns to the interpreter."""
    start = time.process_time()
    if hold_gil:
        # One C-level call: no bytecode runs until it returns, so no Python signal
        # handler can run either. Only SIGKILL stops it early.
        sum(range(int(seconds * _sum_range_rate())))
    else:
        while (spent := time.process_time() - start) < seconds:
            for _ in range(20_000):
                pass
            ctx.progress(spent / seconds)
    return Burned(seconds=round(time.process_time() - start, 4))


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


class Counted(BaseModel):
    count: int


@timebox.task(cost=lambda n: n * math.sqrt(n), example={"n": 300_000})
def count_primes(
    ctx: timebox.TaskContext, n: Annotated[int, Field(ge=2, le=50_000_000)]
) -> Counted:
    """Number of primes below `n`, in pure Python, with progress."""
    divisors: list[int] = []
    keep_below = math.isqrt(n) + 1
    count = 0
    step = max(1, n // 100)
    next_report = step
    for k in range(2, n):
        if k >= next_report:
            ctx.progress(k / n)
            next_report += step
        root = math.isqrt(k)
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
    return Counted(count=count)


class Processed(BaseModel):
    text: str
    words: int


@timebox.task(
    cost=lambda text: len(text),
    example={"text": "The  quick brown fox\njumps over the lazy dog"},
)
def process_text(
    ctx: timebox.TaskContext, text: Annotated[str, StringConstraints(max_length=1_000_000)]
) -> Processed:
    """Normalises text word by word; time grows with its length."""
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
    return Processed(text=" ".join(words), words=len(words))


Dna = Annotated[str, StringConstraints(pattern=r"^[ACGT]*$", max_length=20_000)]


class Aligned(BaseModel):
    score: int


@timebox.task(
    cost=lambda a, b: len(a) * len(b),
    example={"a": "GATTACA" * 40, "b": "GCATGCT" * 40},
)
def align_dna(ctx: timebox.TaskContext, a: Dna, b: Dna) -> Aligned:
    """Global alignment score (Needleman-Wunsch; match +1, mismatch -1, gap -1)."""
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
    return Aligned(score=prev[-1])
