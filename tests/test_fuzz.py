"""Schemathesis against the gateway's own OpenAPI document: no 5xx but the documented
503 (refused, broker) and 504 (deadline)."""

import collections
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import Stack, running_stack

pytestmark = pytest.mark.timeout(180)

SENT: collections.Counter[int] = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_stack(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # short deadlines so RPC examples end fast; no test-only task types
    with running_stack(
        amqp_url,
        tmp_path_factory.mktemp("fuzz"),
        1,
        TIMEBOX_DEFAULT_TIMEOUT="0.5",
        TIMEBOX_MAX_TIMEOUT="1",
        TIMEBOX_TASK_MODULES="examples.tasks",
    ) as stack:
        yield stack
    print(f"\nfuzz: {sum(SENT.values())} requests, status codes {dict(sorted(SENT.items()))}")


def test_no_unexpected_server_errors(fuzz_stack: Stack) -> None:
    # schemathesis' own pytest plugin does not run under this pytest, so its strategies
    # are driven by Hypothesis directly, one operation at a time
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{fuzz_stack.url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_stack.url, timeout=15)
            SENT[response.status_code] += 1
            if response.status_code >= 500 and response.status_code not in (503, 504):
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

        check()
    assert not failures, "\n".join(failures[:10])
