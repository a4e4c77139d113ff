"""GET /v1/models and GET /v1/models/{id}: OpenAI's shape, the served model and its aliases,
behind the same authentication as the rest. (The real `openai` client: tests/test_clients.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.services import create_api_key
from tests.conftest import FakeEncoder, Person

pytestmark = pytest.mark.django_db


def get(path: str, person: Person | None = None, **headers: Any) -> Any:
    credentials = person.client_headers if person else {}
    return APIClient().get(path, **credentials, **headers)


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_it_lists_the_served_model_and_its_aliases_in_openais_shape(
    alice: Person, fake_encoder: FakeEncoder, settings: Any, prefix: str
) -> None:
    settings.MODEL_ALIASES = ["text-embedding-3-small", "org/embedder"]

    response = get(f"{prefix}/models", alice)

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == [
        "fake-model",
        "org/embedder",
        "text-embedding-3-small",
    ]
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["owned_by"] == "embedplatform"  # no hub organisation in "fake-model"


def test_it_names_the_hub_organisation_and_the_files_time_of_the_bundled_model(
    alice: Person, minilm: Any
) -> None:
    from embeddings.encoder import bundled_model_path

    (served, short) = get("/v1/models", alice).json()["data"]

    assert (served["id"], short["id"]) == (
        "sentence-transformers/all-MiniLM-L6-v2",
        "all-MiniLM-L6-v2",
    )
    assert served["owned_by"] == short["owned_by"] == "sentence-transformers"
    created = int((bundled_model_path() / "config.json").stat().st_mtime)
    assert served["created"] == short["created"] == created > 0


@pytest.mark.parametrize("name", ["fake-model", "text-embedding-3-small", "org/embedder"])
def test_it_retrieves_each_listed_model_by_name(
    alice: Person, fake_encoder: FakeEncoder, settings: Any, name: str
) -> None:
    settings.MODEL_ALIASES = ["text-embedding-3-small", "org/embedder"]

    plain = get(f"/v1/models/{name}", alice)
    # The openai client percent-encodes a slash inside the id.
    encoded = get(f"/v1/models/{name.replace('/', '%2F')}", alice)

    for response in (plain, encoded):
        assert response.status_code == 200
        assert response.json()["id"] == name
        assert response.json()["object"] == "model"


def test_it_answers_an_unknown_model_with_openais_404(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    response = get("/v1/models/gpt-4o", alice)

    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "not_found_error",
        "model_not_found",
        "model",
    )
    assert "'fake-model'" in error["message"]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/fake-model", "/models"])
def test_it_answers_no_caller_without_a_credential(fake_encoder: FakeEncoder, path: str) -> None:
    response = get(path)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert get(path, HTTP_AUTHORIZATION="Bearer not-a-token").status_code == 401


def test_it_accepts_a_tenants_api_key(alice: Person, fake_encoder: FakeEncoder) -> None:
    _, secret = create_api_key(tenant=alice.tenant, name="ci", created_by=alice.user)

    response = APIClient().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {secret}")

    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "fake-model"


def test_it_refuses_a_tenant_the_caller_is_no_member_of(
    alice: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    response = get("/v1/models", alice, HTTP_X_TENANT=str(charlie.tenant.pk))

    assert response.status_code == 403


def test_it_says_503_while_no_model_is_loaded(alice: Person) -> None:
    response = get("/v1/models", alice)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_not_ready"


def test_it_documents_both_operations(fake_encoder: FakeEncoder) -> None:
    schema = json.loads(Client().get("/openapi.json").content)

    listing = schema["paths"]["/v1/models"]["get"]
    detail = schema["paths"]["/v1/models/{model_id}"]["get"]
    assert {"200", "401", "403"} <= set(listing["responses"])
    assert {"200", "401", "403", "404"} <= set(detail["responses"])
    assert "bearerAuth" in {name for requirement in listing["security"] for name in requirement}
    model = schema["components"]["schemas"]["OpenAIModel"]
    assert set(model["properties"]) == {"id", "object", "created", "owned_by"}
