"""The truncation contract (text-embeddings-inference's): `truncate` and `truncation_direction`
on every embed endpoint, the x-truncated-inputs header, /embed's and /batch-embed's `truncated`
field, and usage counting the tokens embedded.

The fake encoder (64 tokens at most: one per word plus two special tokens) covers the code around
the model; the direction test runs the real MiniLM."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from django.test import Client

from accounts.models import UsageLog
from tests.conftest import FakeEncoder, Person

pytestmark = pytest.mark.django_db

LONG = "word " * 70  # 72 tokens for the fake encoder, over its 64
REFUSAL_STATUS = {"/embed": 422, "/batch-embed": 422, "/v1/embeddings": 400, "/embeddings": 400}


def post(person: Person, path: str, body: dict[str, Any]) -> Any:
    return Client().post(
        path, json.dumps(body), content_type="application/json", **person.client_headers
    )


def texts_body(path: str, texts: list[str], **options: Any) -> dict[str, Any]:
    if path == "/embed":
        return {"text": texts[0], **options}
    return {"texts" if path == "/batch-embed" else "input": texts, **options}


@pytest.mark.parametrize("path", ["/batch-embed", "/v1/embeddings", "/embeddings"])
def test_it_refuses_an_over_long_input_when_told_not_to_truncate(
    alice: Person, fake_encoder: FakeEncoder, path: str
) -> None:
    response = post(alice, path, texts_body(path, ["short", LONG], truncate=False))

    assert response.status_code == REFUSAL_STATUS[path]
    error = response.json()["error"]
    param = "texts[1]" if path == "/batch-embed" else "input[1]"
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "input_too_long",
        param,
    )
    assert error["message"] == (
        f"{param}: This input has 72 tokens; the model reads at most 64 tokens per input. "
        "Shorten it, or send truncate: true to have it cut."
    )
    # Refused before any model work, logged and charged nothing.
    assert fake_encoder.texts_encoded == 0
    row = UsageLog.objects.get(request_id=response["x-request-id"])
    assert (row.status_code, row.tokens) == (REFUSAL_STATUS[path], 0)


def test_it_names_embeds_only_text_in_the_refusal(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(alice, "/embed", {"text": LONG, "truncate": False})

    assert response.status_code == 422
    assert response.json()["error"]["param"] == "text"
    assert fake_encoder.texts_encoded == 0


@pytest.mark.parametrize("path", ["/embed", "/batch-embed", "/v1/embeddings"])
def test_it_truncates_by_default_and_says_so(
    alice: Person, fake_encoder: FakeEncoder, path: str
) -> None:
    texts = [LONG, "two words"] if path != "/embed" else [LONG]

    response = post(alice, path, texts_body(path, texts))

    assert response.status_code == 200
    assert response["x-truncated-inputs"] == "1"
    body = response.json()
    if path == "/embed":
        assert body["truncated"] is True
    elif path == "/batch-embed":
        assert body["truncated"] == [True, False]
    else:
        assert "truncated" not in body  # OpenAI's shape; the header says it
    # usage counts what was embedded: 64 tokens of the long text, not its 72.
    expected = 64 + (4 if len(texts) == 2 else 0)
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


def test_it_says_nothing_was_truncated(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(alice, "/batch-embed", {"texts": ["a", "b c"], "truncate": False})

    assert response.status_code == 200
    assert response["x-truncated-inputs"] == "0"
    assert response.json()["truncated"] == [False, False]


def test_it_takes_the_default_from_truncate_inputs(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.TRUNCATE_INPUTS = False

    refused = post(alice, "/embed", {"text": LONG})
    allowed = post(alice, "/embed", {"text": LONG, "truncate": True})

    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "input_too_long"
    assert allowed.status_code == 200
    assert allowed["x-truncated-inputs"] == "1"


@pytest.mark.parametrize(
    ("options", "param", "code"),
    [
        ({"truncate": "no"}, "truncate", "invalid"),
        ({"truncate": 0}, "truncate", "invalid"),
        ({"truncation_direction": "middle"}, "truncation_direction", "invalid_choice"),
    ],
)
@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings"])
def test_it_refuses_invalid_truncation_options(
    alice: Person,
    fake_encoder: FakeEncoder,
    path: str,
    options: dict[str, Any],
    param: str,
    code: str,
) -> None:
    response = post(alice, path, texts_body(path, ["a"], **options))

    assert response.status_code == REFUSAL_STATUS[path]
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


def test_it_cuts_the_side_truncation_direction_names(alice: Person, minilm: Any) -> None:
    start = "The cat sat on the mat and purred quietly. " * 40
    end = "Stock markets fell sharply after the announcement. " * 40
    text = start + end  # about 800 tokens; MiniLM reads 256

    def embedding(body: dict[str, Any]) -> np.ndarray:
        response = post(alice, "/embed", body)
        assert response.status_code == 200, response.content
        assert response["x-truncated-inputs"] == "1"  # each text is over 256 tokens
        return np.asarray(response.json()["embedding"])

    right = embedding({"text": text})
    left = embedding({"text": text, "truncation_direction": "left"})
    head = embedding({"text": start})
    tail = embedding({"text": end})

    assert float(right @ head) > 0.99
    assert float(left @ tail) > 0.99
    assert float(left @ right) < 0.5


def test_it_shows_browsers_the_truncation_header(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]

    response = Client().post(
        "/embed",
        json.dumps({"text": LONG}),
        content_type="application/json",
        HTTP_ORIGIN="https://app.example.com",
        **alice.client_headers,
    )

    assert response["x-truncated-inputs"] == "1"
    exposed = response["Access-Control-Expose-Headers"].lower().split(", ")
    assert "x-truncated-inputs" in exposed
