"""A task type is a decorated function: `@timebox.task` reads its input model from the
signature and its output from the return annotation, so spec and code cannot drift
apart. The same object is what a caller calls and what a worker runs."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import (
    Any,
    Generic,
    ParamSpec,
    TypedDict,
    TypeVar,
    Unpack,
    get_type_hints,
    overload,
)

from pydantic import BaseModel, ConfigDict, JsonValue, TypeAdapter, create_model

from contracts.context import TaskContext

P = ParamSpec("P")
R = TypeVar("R")

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
# the queue of every task type that names none: one fleet of workers serves them all
DEFAULT_QUEUE = "default"
# the JSON schema keywords that bound a value: what /v1/task-types lists as limits
CONSTRAINTS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "enum",
)


class Options(TypedDict, total=False):
    """The options of `@timebox.task`."""

    name: str  # default: the function's
    queue: str  # the workers that consume it serve every type in it (DEFAULT_QUEUE)
    # called with the input as the function is, or with the fields it names: the
    # admission's hint of how the run time grows with the input
    cost: Callable[..., float]
    timeout: float  # seconds, for a request that names none
    max_timeout: float
    example: Mapping[str, Any]
    # a failed attempt is tried again, up to `retries` times, if it raised one of
    # `retry_on` (default: any Exception) or its process died, after `backoff` seconds
    # (doubled each time), and only if the time left still covers a run
    retries: int
    retry_on: tuple[type[BaseException], ...]
    backoff: float


class Task(Generic[P, R]):
    """A task type: the function, its input model and output type, and the options
    given to the decorator. Calling it calls the function, here, as it is."""

    def __init__(self, fn: Callable[P, R], **options: Unpack[Options]) -> None:
        where = f"@timebox.task {getattr(fn, '__qualname__', fn)!r}"
        self.fn = fn
        self.name = options.get("name") or fn.__name__
        self.queue = options.get("queue", DEFAULT_QUEUE)
        cost, example = options.get("cost"), options.get("example")
        timeout, max_timeout = options.get("timeout"), options.get("max_timeout")
        _check(where, fn, self.name, self.queue, cost, timeout, max_timeout)
        self.description = inspect.getdoc(fn) or ""
        hints = get_type_hints(fn, include_extras=True)
        self.input_model, self._model_parameter, self._context = _input_of(fn, hints, where)
        self.output: TypeAdapter[R] = TypeAdapter(hints.get("return", Any))
        self.cost = cost
        self._cost_takes = _parameters(cost) if cost is not None else None
        self.timeout = timeout
        self.max_timeout = max_timeout
        self.retries = options.get("retries", 0)
        self.retry_on = options.get("retry_on", (Exception,))
        self.backoff = options.get("backoff", 0.5)
        _check_retries(where, self.retries, self.retry_on, self.backoff)
        self.example = dict(example) if example is not None else None
        if self.example is not None:
            self.input_model.model_validate(self.example)  # a bad example fails here
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<timebox task {self.name}>"

    def parse(self, given: BaseModel | Mapping[str, Any] | None = None, **fields: Any) -> BaseModel:
        """The input model of `given` (a model or a mapping) or of keyword fields."""
        if isinstance(given, self.input_model):
            return given
        data = given.model_dump() if isinstance(given, BaseModel) else dict(given or {})
        return self.input_model.model_validate(data | fields)

    def cost_of(self, task_input: BaseModel) -> float | None:
        """The input's cost hint for admission, in whatever unit `cost` counts."""
        if self.cost is None:
            return None
        if self._model_parameter is not None:
            return float(self.cost(task_input))
        return float(self.cost(**_fields(task_input, self._cost_takes)))

    def run(self, task_input: BaseModel, ctx: TaskContext) -> JsonValue:
        """Calls the function on a validated input; its output, checked against the
        return annotation, as JSON."""
        given: dict[str, Any] = {self._context: ctx} if self._context else {}
        if self._model_parameter is not None:
            given[self._model_parameter] = task_input
        else:
            given.update(_fields(task_input))
        function: Callable[..., Any] = self.fn
        output = self.output.validate_python(function(**given))
        return self.output.dump_python(output, mode="json")  # type: ignore[no-any-return]

    def retried(self, exc: BaseException) -> bool:
        """Whether an attempt that raised `exc` may be tried again."""
        return self.retries > 0 and isinstance(exc, self.retry_on)

    @functools.cached_property
    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    @functools.cached_property
    def output_schema(self) -> dict[str, Any]:
        return self.output.json_schema()

    @functools.cached_property
    def digest(self) -> str:
        """Of the input schema: a gateway and a worker that disagree run different code."""
        canonical = json.dumps(self.input_schema, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @functools.cached_property
    def limits(self) -> dict[str, dict[str, Any]]:
        """The bounds on each input field, as the input schema states them."""
        limits = {}
        for field, schema in self.input_schema.get("properties", {}).items():
            found = {k: v for s in (schema, *schema.get("anyOf", ())) for k, v in s.items()}
            bounds = {k: found[k] for k in CONSTRAINTS if k in found}
            if bounds:
                limits[field] = bounds
        return limits


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(**options: Unpack[Options]) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None, /, **options: Unpack[Options]
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Declares a task type. The input is either one pydantic model parameter or plain
    typed parameters (defaults and `Annotated` constraints allowed); a parameter
    annotated `TaskContext` gets the context. The options are those of `Options`; the
    description is the docstring."""

    def declare(fn: Callable[P, R]) -> Task[P, R]:
        return Task(fn, **options)

    return declare if fn is None else declare(fn)


def load_tasks(modules: Iterable[str]) -> dict[str, Task[..., Any]]:
    """The tasks of each module (every `Task` among its top-level names), by name."""
    tasks: dict[str, Task[..., Any]] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        found = [value for value in vars(module).values() if isinstance(value, Task)]
        if not found:
            raise LookupError(f"module {module_name!r} declares no @timebox.task")
        for found_task in found:
            known = tasks.setdefault(found_task.name, found_task)
            if known is not found_task:
                raise LookupError(
                    f"two tasks are named {found_task.name!r}: {known.fn.__module__}."
                    f"{known.fn.__qualname__} and {module_name}.{found_task.fn.__qualname__}"
                )
    return tasks


def routes(tasks: Iterable[Task[..., Any]]) -> dict[str, str]:
    """Each task type's queue, by type."""
    return {task.name: task.queue for task in tasks}


def module_names(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _check(
    where: str,
    fn: Callable[..., Any],
    name: str,
    queue: str,
    cost: Callable[..., float] | None,
    timeout: float | None,
    max_timeout: float | None,
) -> None:
    """Refuses, where the task is declared, what cannot be a task."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"{where}: a task runs in a process of its own; write a plain def")
    for text, what in ((name, "task name"), (queue, "queue name")):
        if not NAME.match(text):
            raise TypeError(f"{where}: {text!r} is not a {what} (letters, digits, _ . -)")
    if cost is not None and not callable(cost):
        raise TypeError(f"{where}: cost must be a function of the input")
    for seconds, what in ((timeout, "timeout"), (max_timeout, "max_timeout")):
        if seconds is not None and not 0 < seconds < math.inf:
            raise TypeError(f"{where}: {what} must be a positive number of seconds")
    if (timeout or 0) > (max_timeout or math.inf):
        raise TypeError(f"{where}: timeout {timeout:g} s is over max_timeout {max_timeout:g} s")


def _check_retries(where: str, retries: object, retry_on: object, backoff: object) -> None:
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise TypeError(f"{where}: retries must be a whole number, 0 or more")
    if not isinstance(retry_on, tuple) or not all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in retry_on
    ):
        raise TypeError(f"{where}: retry_on must be a tuple of exception classes")
    if not isinstance(backoff, int | float) or not 0 <= backoff < math.inf:
        raise TypeError(f"{where}: backoff must be a number of seconds, 0 or more")


def _input_of(
    fn: Callable[..., Any], hints: dict[str, Any], where: str
) -> tuple[type[BaseModel], str | None, str | None]:
    """(input model, the parameter that takes it whole if any, the context parameter)."""
    fields: dict[str, Any] = {}
    context = None
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{where}: *args and **kwargs cannot be a task's input")
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise TypeError(f"{where}: parameter {parameter.name!r} is positional-only")
        hint = hints.get(parameter.name, parameter.empty)
        if inspect.isclass(hint) and issubclass(hint, TaskContext):
            if context is not None:
                raise TypeError(f"{where}: two TaskContext parameters")
            context = parameter.name
            continue
        if hint is parameter.empty:
            raise TypeError(f"{where}: parameter {parameter.name!r} has no type annotation")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hint, default)
    if len(fields) == 1:
        [(parameter_name, (hint, default))] = fields.items()
        if inspect.isclass(hint) and issubclass(hint, BaseModel) and default is ...:
            return hint, parameter_name, context
    camel = "".join(part[:1].upper() + part[1:] for part in re.split(r"[_.-]", fn.__name__))
    model = create_model(
        f"{camel}Input", __config__=ConfigDict(extra="forbid"), __module__=fn.__module__, **fields
    )
    return model, None, context


def _fields(task_input: BaseModel, names: set[str] | None = None) -> dict[str, Any]:
    """The input's fields as keyword arguments: all, or those of `names`."""
    fields = type(task_input).model_fields
    return {k: getattr(task_input, k) for k in fields if names is None or k in names}


def _parameters(fn: Callable[..., Any]) -> set[str] | None:
    """The names `fn` takes as keywords; None if it takes any (**kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}
