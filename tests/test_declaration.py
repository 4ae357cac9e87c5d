"""`@timebox.task` turns a typed function into a task type: the input model from its
signature, the output from its return annotation, the options from the decorator."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field, ValidationError

import timebox
from contracts.deadline import Deadline
from contracts.settings import CommonSettings
from contracts.tasks import load_tasks


def context() -> timebox.TaskContext:
    return timebox.TaskContext("t", Deadline.after(60, maximum=60), lambda f, m: None)


class Size(BaseModel):
    width: int
    height: int = 1


class Area(BaseModel):
    area: int


def test_plain_parameters_become_the_input_model_with_their_constraints() -> None:
    @timebox.task
    def resize(
        width: Annotated[int, Field(gt=0, le=4096)],
        ctx: timebox.TaskContext,
        label: Annotated[str, Field(max_length=10)] = "x",
    ) -> Area:
        """Resizes an image."""
        return Area(area=width)

    schema = resize.input_schema
    assert set(schema["properties"]) == {"width", "label"}  # the context is no input
    assert schema["required"] == ["width"]
    assert resize.limits == {
        "width": {"maximum": 4096, "exclusiveMinimum": 0},
        "label": {"maxLength": 10},
    }
    assert resize.name == "resize"
    assert resize.description == "Resizes an image."
    assert resize.output_schema["properties"]["area"]["type"] == "integer"
    with pytest.raises(ValidationError):
        resize.parse(width=0)
    with pytest.raises(ValidationError):
        resize.parse(width=1, unknown=2)  # extra fields are refused
    assert resize.run(resize.parse({"width": 7}), context()) == {"area": 7}


def test_one_model_parameter_is_the_input_model_and_the_context_may_be_anywhere() -> None:
    seen: list[object] = []

    @timebox.task
    def area(ctx: timebox.TaskContext, size: Size) -> int:
        seen.append(ctx)
        return size.width * size.height

    assert area.input_model is Size
    given = context()
    assert area.run(area.parse(width=3, height=4), given) == 12
    assert seen == [given]
    assert area.output_schema == {"type": "integer"}


def test_the_return_annotation_is_checked_and_serialised() -> None:
    @timebox.task
    def wrong(n: int) -> int:
        return "not a number"  # type: ignore[return-value]

    @timebox.task
    def untyped(n: int):  # type: ignore[no-untyped-def]
        return {"n": n}

    with pytest.raises(ValidationError):
        wrong.run(wrong.parse(n=1), context())
    assert untyped.run(untyped.parse(n=2), context()) == {"n": 2}


def test_a_decorated_function_is_still_the_function() -> None:
    @timebox.task
    def add(a: int, b: int = 2) -> int:
        return a + b

    assert add(1) == 3
    assert add.__name__ == "add"
    assert isinstance(add, timebox.Task)


def test_the_options_name_cost_timeouts_and_example() -> None:
    @timebox.task(
        name="align",
        cost=lambda a, b: len(a) * len(b),
        timeout=5,
        max_timeout=30,
        example={"a": "AC", "b": "G"},
    )
    def align_dna(a: str, b: str, gap: int = -1) -> int:
        return 0

    @timebox.task(cost=lambda size: size.width)
    def by_model(size: Size) -> None:
        return None

    assert align_dna.name == "align"
    assert align_dna.cost_of(align_dna.parse(a="ACG", b="AC")) == 6.0  # only the fields it names
    assert by_model.cost_of(Size(width=9)) == 9.0  # a model task's cost takes the model
    settings = CommonSettings(default_timeout=60, max_timeout=600)
    assert settings.timeouts(align_dna) == (5, 30)
    assert settings.timeouts(by_model) == (60, 600)
    assert align_dna.example == {"a": "AC", "b": "G"}
    assert align_dna.digest != by_model.digest
    assert len(align_dna.digest) == 16


def test_a_task_only_narrowing_the_maximum_gets_a_default_within_it() -> None:
    @timebox.task(max_timeout=10)
    def short(n: int) -> int:
        return n

    assert CommonSettings(default_timeout=60, max_timeout=600).timeouts(short) == (10, 10)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(*args: int) -> None: ...", "*args"),
        ("def f(n) -> None: ...", "no type annotation"),
        ("async def f(n: int) -> None: ...", "plain def"),
        ("def f(n: int, /) -> None: ...", "positional-only"),
        (
            "def f(a: timebox.TaskContext, b: timebox.TaskContext) -> None: ...",
            "two TaskContext",
        ),
    ],
)
def test_a_function_that_cannot_be_a_task_is_refused_where_it_is_declared(
    source: str, message: str
) -> None:
    namespace: dict[str, Any] = {"timebox": timebox}
    exec(source, namespace)  # the annotations as a user's module writes them
    with pytest.raises(TypeError, match=message.replace("*", r"\*")):
        timebox.task(namespace["f"])


def test_bad_options_are_refused_where_the_task_is_declared() -> None:
    def f(n: int) -> int:
        return n

    with pytest.raises(TypeError, match="not a task name"):
        timebox.task(name="has space")(f)
    with pytest.raises(TypeError, match="over max_timeout"):
        timebox.task(timeout=20, max_timeout=10)(f)
    with pytest.raises(TypeError, match="positive"):
        timebox.task(timeout=0)(f)
    with pytest.raises(ValidationError):
        timebox.task(example={"n": "many"})(f)


def test_a_module_s_tasks_are_found_by_name_and_clashes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def module(name: str, body: str) -> None:
        (tmp_path / f"{name}.py").write_text("import timebox\n" + textwrap.dedent(body))

    module(
        "tb_one",
        """
        @timebox.task
        def first(n: int) -> int:
            return n

        @timebox.task(name="second")
        def another(n: int) -> int:
            return n
        """,
    )
    module("tb_again", "from tb_one import first\n")  # imported, not declared twice
    module("tb_clash", "@timebox.task\ndef first(m: str) -> str:\n    return m\n")
    module("tb_none", "def plain() -> None: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert set(load_tasks(["tb_one", "tb_again"])) == {"first", "second"}
        with pytest.raises(LookupError, match="two tasks are named 'first'"):
            load_tasks(["tb_one", "tb_clash"])
        with pytest.raises(LookupError, match=r"declares no @timebox\.task"):
            load_tasks(["tb_none"])
    finally:
        for name in ("tb_one", "tb_again", "tb_clash", "tb_none"):
            sys.modules.pop(name, None)
