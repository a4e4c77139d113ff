"""schemathesis against the real service: every operation of /openapi.json is called with the
document's own examples and with requests generated from its schemas (valid and invalid), with
a valid bearer token, and every answer must be what the document says: a documented status,
content type, headers and body, valid input accepted, invalid input refused, and no 5xx.

Bounded and repeatable: offline (gunicorn on 127.0.0.1 with the bundled MiniLM), a fixed seed
(derandomized), a few examples per operation and a deadline for the whole run."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import Person
from tests.service import Service, start_service

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]

EXAMPLES_PER_OPERATION = 8
RUN_DEADLINE_SECONDS = 600
# Limits far above what the run sends: a 429 would hide what is being tested.
GENEROUS_LIMITS = {
    "RATE_LIMIT_PER_MIN": "1000000",
    "TOKENS_PER_MIN": "1000000000",
    "MONTHLY_TOKEN_QUOTA": "1000000000",
}


@pytest.fixture(scope="module")
def service(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    started = start_service(
        tmp_path_factory.mktemp("schemathesis"),
        env={"MODEL_QUANTIZATION": "fp32", **GENEROUS_LIMITS},
    )
    yield started
    started.stop()


def holds_token_ids(body: Any) -> bool:
    """Token ids may decode to nothing but special tokens or spaces, which is refused as an empty
    text (422 empty_text): a rule about the tokenizer that no JSON Schema can state. Such valid-
    looking requests may be refused; everything else about them is still checked."""
    items = body.get("input") if isinstance(body, dict) else None
    return isinstance(items, list) and any(not isinstance(item, str) for item in items)


BOUNDED = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,  # the fixed seed: the same requests on every run
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.mark.timeout(RUN_DEADLINE_SECONDS + 300)
def test_it_answers_as_the_openapi_document_says(service: Service, alice: Person) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    headers = {"Authorization": f"Bearer {alice.token}"}
    started = time.monotonic()
    calls: Counter[str] = Counter()

    def check(case: Any) -> None:
        assert time.monotonic() - started < RUN_DEADLINE_SECONDS, "the run took too long"
        excluded = [positive_data_acceptance] if holds_token_ids(case.body) else []
        case.call_and_validate(headers=headers, excluded_checks=excluded, timeout=30)
        calls[f"{case.method.upper()} {case.path}"] += 1

    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    try:
        for operation in operations:
            for strategy in [
                *operation.get_strategies_from_examples(),
                operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            ]:
                BOUNDED(given(case=strategy)(check))()
            invalid = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            # An operation that takes nothing (GET /health) has nothing to send invalid.
            with contextlib.suppress(Unsatisfiable):
                BOUNDED(given(case=invalid)(check))()
            print(
                f"{operation.method.upper()} {operation.path}: {time.monotonic() - started:.0f} s"
            )
    except Exception as exc:
        # The service's own account of a 5xx is in its log, which pytest's tmp_path may not keep.
        errors = [
            json.dumps(record) for record in service.log_records() if record.get("level") == "error"
        ]
        raise AssertionError(
            f"{exc}\nservice errors:\n" + "\n".join(e[:3000] for e in errors[-3:])
        ) from exc

    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /embed",
        "POST /batch-embed",
        "POST /v1/embeddings",
        "GET /usage",
        "GET /health",
    }
    assert set(calls) == {f"{op.method.upper()} {op.path}" for op in operations}, calls
