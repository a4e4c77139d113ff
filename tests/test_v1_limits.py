"""OpenAI's limits on /v1/embeddings: 2048 inputs by default, lowered by a plan or tenant, served
in chunks so that one request never holds more than a chunk of the model's queue."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from accounts.models import Plan
from embeddings import encoder, runtime
from tests.conftest import FakeEncoder, Person

pytestmark = pytest.mark.django_db


def post(person: Person, path: str, body: dict[str, Any]) -> Any:
    return Client().post(
        path, json.dumps(body), content_type="application/json", **person.client_headers
    )


caps: list[int | None] = []


@pytest.fixture
def submissions(fake_encoder: FakeEncoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of texts of each submission to the model's queue, and the cap it carried."""
    served = runtime.get_runtime()
    assert served is not None
    sizes: list[int] = []
    embed = served.embed

    def spy(tokenized: encoder.Tokenized, **kwargs: Any) -> Any:
        sizes.append(len(tokenized.inputs))
        caps.append(kwargs.get("max_texts_in_flight"))
        return embed(tokenized, **kwargs)

    monkeypatch.setattr(served, "embed", spy)
    caps.clear()
    return sizes


def test_it_serves_2048_inputs_in_chunks_in_order(
    alice: Person, fake_encoder: FakeEncoder, submissions: list[int]
) -> None:
    texts = [f"text {i}" for i in range(2048)]

    body = post(alice, "/v1/embeddings", {"input": texts}).json()

    assert [item["index"] for item in body["data"]] == list(range(2048))
    assert submissions == [256] * 8  # MAX_TEXTS_PER_REQUEST at a time
    one = post(alice, "/v1/embeddings", {"input": texts[1500]}).json()["data"][0]["embedding"]
    assert body["data"][1500]["embedding"] == one
    assert body["usage"]["prompt_tokens"] == 2048 * 4


def test_it_refuses_more_than_2048_inputs_with_400(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    response = post(alice, "/v1/embeddings", {"input": ["a"] * 2049})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_inputs"
    assert fake_encoder.texts_encoded == 0


def test_it_keeps_the_original_apis_limit(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(alice, "/batch-embed", {"texts": ["a"] * 257})

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_inputs"


def test_it_lets_the_setting_raise_or_lower_the_ceiling(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.OPENAI_MAX_INPUTS_PER_REQUEST = 10

    assert post(alice, "/v1/embeddings", {"input": ["a"] * 10}).status_code == 200
    assert post(alice, "/v1/embeddings", {"input": ["a"] * 11}).status_code == 400


def test_it_lets_a_plan_or_tenant_lower_it(alice: Person, fake_encoder: FakeEncoder) -> None:
    tenant = alice.tenant
    tenant.plan = Plan.objects.create(name="small", max_texts_per_request=1000)
    tenant.save(update_fields=["plan"])

    assert post(alice, "/v1/embeddings", {"input": ["a"] * 1000}).status_code == 200
    refused = post(alice, "/v1/embeddings", {"input": ["a"] * 1001})
    assert refused.status_code == 400
    assert "at most 1000 texts" in refused.json()["error"]["message"]
    # The original API stays at MAX_TEXTS_PER_REQUEST, which no plan can raise.
    assert post(alice, "/batch-embed", {"texts": ["a"] * 257}).status_code == 413

    tenant.max_texts_per_request = 3
    tenant.save(update_fields=["max_texts_per_request"])
    assert post(alice, "/v1/embeddings", {"input": ["a"] * 4}).status_code == 400


def test_it_holds_a_tenant_to_its_plans_texts_in_flight(
    alice: Person, fake_encoder: FakeEncoder, submissions: list[int]
) -> None:
    tenant = alice.tenant
    tenant.plan = Plan.objects.create(name="narrow", max_texts_in_flight=100)
    tenant.save(update_fields=["plan"])

    body = post(alice, "/v1/embeddings", {"input": [f"t {i}" for i in range(250)]}).json()

    assert len(body["data"]) == 250
    assert submissions == [100, 100, 50]  # never more in the queue than the plan allows
    assert caps == [100, 100, 100]
    tenant.max_texts_in_flight = 30  # a tenant's own value overrides its plan's
    tenant.save(update_fields=["max_texts_in_flight"])
    submissions.clear()
    post(alice, "/batch-embed", {"texts": ["a"] * 70})
    assert submissions == [30, 30, 10]
    assert caps[-1] == 30
