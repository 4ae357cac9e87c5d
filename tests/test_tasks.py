"""The demo task functions against independent reference computations, called as
plain functions, as a user's own tests would call them."""

import random

import pytest

from contracts.context import TaskContext
from contracts.deadline import Deadline
from contracts.tasks import load_tasks
from examples.tasks import align_dna, burn_cpu, count_primes, echo, process_text


def ctx(reports: list[float] | None = None) -> TaskContext:
    def sink(fraction: float, message: str | None) -> None:
        if reports is not None:
            reports.append(fraction)

    return TaskContext("t", Deadline.after(60, maximum=60), sink, min_interval=0)


def sieve_count(n: int) -> int:
    is_prime = bytearray([1]) * n
    is_prime[:2] = b"\x00\x00"
    for i in range(2, int(n**0.5) + 1):
        if is_prime[i]:
            is_prime[i * i :: i] = bytearray(len(range(i * i, n, i)))
    return sum(is_prime)


@pytest.mark.parametrize("n", [2, 3, 4, 10, 11, 100, 7919, 7920, 100_000])
def test_count_primes_matches_a_sieve(n: int) -> None:
    reports: list[float] = []
    assert count_primes(ctx(reports), n).count == sieve_count(n)


def reference_alignment(a: str, b: str) -> int:
    """Full-matrix Needleman-Wunsch, written independently of the task's row version."""
    rows, cols = len(a) + 1, len(b) + 1
    m = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        m[i][0] = -i
    for j in range(cols):
        m[0][j] = -j
    for i in range(1, rows):
        for j in range(1, cols):
            s = 1 if a[i - 1] == b[j - 1] else -1
            m[i][j] = max(m[i - 1][j - 1] + s, m[i - 1][j] - 1, m[i][j - 1] - 1)
    return m[-1][-1]


@pytest.mark.parametrize(
    ("a", "b", "score"),
    [
        ("", "", 0),
        ("A", "", -1),
        ("", "ACG", -3),
        ("GATTACA", "GATTACA", 7),
        ("GATTACA", "GCATGCU".replace("U", "T"), 0),
        ("A", "T", -1),
    ],
)
def test_align_dna_known_scores(a: str, b: str, score: int) -> None:
    assert align_dna(ctx(), a, b).score == score == reference_alignment(a, b)


def test_align_dna_matches_the_reference_on_random_sequences() -> None:
    rng = random.Random(7)
    for _ in range(20):
        a = "".join(rng.choice("ACGT") for _ in range(rng.randint(0, 60)))
        b = "".join(rng.choice("ACGT") for _ in range(rng.randint(0, 60)))
        assert align_dna(ctx(), a, b).score == reference_alignment(a, b)


def test_process_text_normalises_words() -> None:
    out = process_text(ctx(), "  The Quick\tbrown\n\nFOX  ")
    assert (out.text, out.words) == ("the quick brown fox", 4)


def test_echo_returns_its_payload() -> None:
    assert echo({"a": [1, None]}).payload == {"a": [1, None]}


@pytest.mark.parametrize("hold_gil", [False, True])
def test_burn_cpu_spends_about_the_cpu_asked(hold_gil: bool) -> None:
    reports: list[float] = []
    out = burn_cpu(ctx(reports), 0.2, hold_gil)
    assert 0.1 <= out.seconds <= 0.6
    assert hold_gil or reports


def test_every_demo_task_runs_its_example_as_a_worker_would() -> None:
    tasks = load_tasks(["examples.tasks"])
    assert set(tasks) == {"echo", "burn_cpu", "count_primes", "process_text", "align_dna"}
    for task in tasks.values():
        assert task.example is not None
        assert task.description
        example = dict(task.example)
        if task.name == "burn_cpu":
            example["seconds"] = 0.01
        output = task.run(task.parse(example), ctx())
        assert task.output.validate_python(output) is not None
