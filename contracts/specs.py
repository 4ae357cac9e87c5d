"""Task specs: name, input and output models, limits, cost hint. The functions that
do the work live in `compute.tasks`, under the same names."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints

I = TypeVar("I", bound=BaseModel)  # noqa: E741


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EchoInput(_Model):
    payload: JsonValue


class EchoOutput(_Model):
    payload: JsonValue


class BurnCpuInput(_Model):
    seconds: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
    hold_gil: bool = False


class BurnCpuOutput(_Model):
    seconds: float


MAX_PRIMES_N = 50_000_000


class CountPrimesInput(_Model):
    n: Annotated[int, Field(ge=2, le=MAX_PRIMES_N)]


class CountPrimesOutput(_Model):
    count: int


MAX_TEXT = 1_000_000


class ProcessTextInput(_Model):
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT)]


class ProcessTextOutput(_Model):
    text: str
    words: int


MAX_DNA = 20_000
Dna = Annotated[str, StringConstraints(pattern=r"^[ACGT]*$", max_length=MAX_DNA)]


class AlignDnaInput(_Model):
    a: Dna
    b: Dna


class AlignDnaOutput(_Model):
    score: int


@dataclass(frozen=True)
class TaskSpec(Generic[I]):
    name: str
    description: str
    input_model: type[I]
    output_model: type[BaseModel]
    example: dict[str, Any]
    cost: Callable[[I], float] | None = None
    cost_unit: str | None = None
    largest: Callable[[float], dict[str, Any]] | None = None  # biggest input of a cost
    limits: dict[str, Any] = field(default_factory=dict)

    def cost_of(self, task_input: BaseModel) -> float | None:
        if self.cost is None or not isinstance(task_input, self.input_model):
            return None
        cost: float = self.cost(task_input)
        return float(cost)


def _align_cost(i: AlignDnaInput) -> float:
    return float(len(i.a) * len(i.b))


def _primes_cost(i: CountPrimesInput) -> float:
    return i.n * math.sqrt(i.n)


def _text_cost(i: ProcessTextInput) -> float:
    return float(len(i.text))


def _burn_cost(i: BurnCpuInput) -> float:
    return i.seconds


SPECS: dict[str, TaskSpec[Any]] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="echo",
            description="Returns its payload: measures the system's own overhead.",
            input_model=EchoInput,
            output_model=EchoOutput,
            example={"payload": {"hello": "world"}},
        ),
        TaskSpec(
            name="burn_cpu",
            description=(
                "Keeps one core busy for about `seconds` of CPU, reporting progress. With "
                "`hold_gil` the work is one long C call that never returns to the interpreter."
            ),
            input_model=BurnCpuInput,
            output_model=BurnCpuOutput,
            example={"seconds": 3, "hold_gil": False},
            cost=_burn_cost,
            cost_unit="CPU second",
            largest=lambda c: {"seconds": round(c, 3)},
            limits={"seconds": {"gt": 0, "le": 3600}},
        ),
        TaskSpec(
            name="count_primes",
            description="Number of primes below `n`, in pure Python, with progress.",
            input_model=CountPrimesInput,
            output_model=CountPrimesOutput,
            example={"n": 300_000},
            cost=_primes_cost,
            cost_unit="n**1.5",
            largest=lambda c: {"n": math.floor(c ** (2 / 3))},
            limits={"n": {"ge": 2, "le": MAX_PRIMES_N}},
        ),
        TaskSpec(
            name="process_text",
            description="Normalises text word by word; time grows with its length.",
            input_model=ProcessTextInput,
            output_model=ProcessTextOutput,
            example={"text": "The  quick brown fox\njumps over the lazy dog"},
            cost=_text_cost,
            cost_unit="character",
            largest=lambda c: {"text": {"max_length": math.floor(c)}},
            limits={"text": {"max_length": MAX_TEXT}},
        ),
        TaskSpec(
            name="align_dna",
            description=(
                "Global alignment score (Needleman-Wunsch; match +1, mismatch -1, gap -1)."
            ),
            input_model=AlignDnaInput,
            output_model=AlignDnaOutput,
            example={"a": "GATTACA" * 40, "b": "GCATGCT" * 40},
            cost=_align_cost,
            cost_unit="cell (len(a)*len(b))",
            largest=lambda c: {"len(a)*len(b)": math.floor(c)},
            limits={"a": {"max_length": MAX_DNA}, "b": {"max_length": MAX_DNA}},
        ),
    )
}


def load_specs(plugins: Iterable[str] = ()) -> dict[str, TaskSpec[Any]]:
    """The demo specs plus those of each plugin module (its `SPECS` dict)."""
    specs = dict(SPECS)
    for name in plugins:
        specs.update(importlib.import_module(name).SPECS)
    return specs


def plugin_names(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]
