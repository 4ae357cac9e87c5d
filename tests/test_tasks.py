"""The demo task functions against independent reference computations."""

import random

import pytest

from compute.context import TaskContext
from compute.tasks import align_dna, burn_cpu, count_primes, echo, process_text
from contracts.deadline import Deadline
from contracts.specs import (
    SPECS,
    AlignDnaInput,
    BurnCpuInput,
    CountPrimesInput,
    EchoInput,
    ProcessTextInput,
)


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
    assert count_primes(CountPrimesInput(n=n), ctx(reports)).count == sieve_count(n)


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
    assert align_dna(AlignDnaInput(a=a, b=b), ctx()).score == score == reference_alignment(a, b)


def test_align_dna_matches_the_reference_on_random_sequences() -> None:
    rng = random.Random(7)
    for _ in range(20):
        a = "".join(rng.choice("ACGT") for _ in range(rng.randint(0, 60)))
        b = "".join(rng.choice("ACGT") for _ in range(rng.randint(0, 60)))
        assert align_dna(AlignDnaInput(a=a, b=b), ctx()).score == reference_alignment(a, b)


def test_process_text_normalises_words() -> None:
    out = process_text(ProcessTextInput(text="  The Quick\tbrown\n\nFOX  "), ctx())
    assert (out.text, out.words) == ("the quick brown fox", 4)


def test_echo_returns_its_payload() -> None:
    assert echo(EchoInput(payload={"a": [1, None]}), ctx()).payload == {"a": [1, None]}


@pytest.mark.parametrize("hold_gil", [False, True])
def test_burn_cpu_spends_about_the_cpu_asked(hold_gil: bool) -> None:
    reports: list[float] = []
    out = burn_cpu(BurnCpuInput(seconds=0.2, hold_gil=hold_gil), ctx(reports))
    assert 0.1 <= out.seconds <= 0.6
    assert hold_gil or reports


def test_every_spec_has_a_function_and_a_valid_example() -> None:
    from compute.tasks import FUNCTIONS

    assert set(SPECS) == set(FUNCTIONS)
    for spec in SPECS.values():
        spec.input_model.model_validate(spec.example)
