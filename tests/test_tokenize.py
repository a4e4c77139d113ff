"""POST /tokenize and POST /decode with the served model's tokenizer (the real MiniLM): ids,
pieces with their character offsets, the round trip, and the metering: authenticated, counted
against requests per minute, logged with zero tokens, never charged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from accounts.models import Plan, QuotaPeriod, UsageLog
from tests.conftest import FakeEncoder, Person

pytestmark = pytest.mark.django_db


def post(person: Person | None, path: str, body: Any) -> Any:
    headers = person.client_headers if person is not None else {}
    return Client().post(path, json.dumps(body), content_type="application/json", **headers)


def test_it_tokenizes_as_the_model_reads(alice: Person, minilm: Any) -> None:
    text = "Hello wörld, embeddings!"

    response = post(alice, "/tokenize", {"inputs": text, "return_offsets": True})

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["model"], body["max_seq_length"]) == (minilm.name, 256)
    [item] = body["data"]
    # The same ids the embed path reads for this text (special tokens included, not truncated).
    assert item["ids"] == minilm.tokenize([text], prompt="").inputs[0]
    pieces = item["pieces"]
    assert [piece["id"] for piece in pieces] == item["ids"]
    assert (pieces[0]["special"], pieces[-1]["special"]) == (True, True)
    for piece in pieces[1:-1]:
        assert piece["text"] == text[piece["start"] : piece["stop"]]
        assert piece["special"] is False
    assert "".join(piece["text"] for piece in pieces).replace(" ", "") == text.replace(" ", "")


def test_it_counts_a_text_over_the_limit_in_full(alice: Person, minilm: Any) -> None:
    body = post(alice, "/tokenize", {"inputs": ["a", "word " * 300]}).json()

    assert [len(item["ids"]) for item in body["data"]] == [3, 302]
    assert "pieces" not in body["data"][0]
    without = post(alice, "/tokenize", {"inputs": "word", "add_special_tokens": False}).json()
    assert len(without["data"][0]["ids"]) == 1


def test_it_decodes_what_it_tokenized(alice: Person, minilm: Any) -> None:
    ids = post(alice, "/tokenize", {"inputs": ["hello world", "the cat"]}).json()["data"]

    one = post(alice, "/decode", {"ids": ids[0]["ids"]})
    many = post(alice, "/decode", {"ids": [item["ids"] for item in ids]})

    assert one.status_code == 200
    assert one.json() == {"texts": ["hello world"], "model": minilm.name}
    assert many.json()["texts"] == ["hello world", "the cat"]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/tokenize", {"inputs": ""}, "inputs", "empty_text"),
        ("/tokenize", {"inputs": []}, "inputs", "empty"),
        ("/tokenize", {"inputs": [1]}, "inputs", "invalid"),
        ("/tokenize", {"inputs": "a", "return_offsets": "yes"}, "return_offsets", "invalid"),
        ("/tokenize", {}, "inputs", "required"),
        ("/decode", {"ids": []}, "ids", "empty"),
        ("/decode", {"ids": [1, -2]}, "ids", "invalid"),
        ("/decode", {"ids": "1 2"}, "ids", "invalid"),
        ("/decode", {"ids": [7, 30522]}, "ids[1]", "invalid_token_id"),
        ("/decode", {"ids": [[7], [8, 10**9]]}, "ids[1][1]", "invalid_token_id"),
    ],
)
def test_it_refuses_invalid_requests_with_422(
    alice: Person, minilm: Any, path: str, body: Any, param: str, code: str
) -> None:
    response = post(alice, path, body)

    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_it_refuses_more_texts_than_the_plan_allows(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    alice.tenant.plan = Plan.objects.create(name="two texts", max_texts_per_request=2)
    alice.tenant.save(update_fields=["plan"])

    assert post(alice, "/tokenize", {"inputs": ["a", "b", "c"]}).status_code == 413
    assert post(alice, "/decode", {"ids": [[1], [2], [3]]}).status_code == 413


@pytest.mark.parametrize("path", ["/tokenize", "/decode"])
def test_it_needs_a_credential(db: None, fake_encoder: FakeEncoder, path: str) -> None:
    response = post(None, path, {"inputs": "a", "ids": [1]})

    assert response.status_code == 401
    assert UsageLog.objects.count() == 0


def test_it_logs_each_request_and_charges_nothing(alice: Person, fake_encoder: FakeEncoder) -> None:
    tokenized = post(alice, "/tokenize", {"inputs": ["one two", "three"]})
    decoded = post(alice, "/decode", {"ids": [[1, 2], [3]]})
    embedded = post(alice, "/embed", {"text": "one two"})

    rows = {row.endpoint: row for row in UsageLog.objects.filter(tenant=alice.tenant)}
    assert (rows["tokenize"].status_code, rows["tokenize"].tokens) == (200, 0)
    assert rows["tokenize"].inputs == 2
    assert rows["tokenize"].request_id == tokenized["x-request-id"]
    assert (rows["decode"].status_code, rows["decode"].tokens) == (200, 0)
    assert rows["decode"].request_id == decoded["x-request-id"]
    # The month's charge is the embed request's tokens alone.
    [period] = QuotaPeriod.objects.filter(tenant=alice.tenant)
    assert (period.tokens, period.requests) == (embedded.json()["usage"]["prompt_tokens"], 1)
    assert fake_encoder.texts_encoded == 1


def test_it_counts_against_requests_per_minute_only(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    alice.tenant.plan = Plan.objects.create(
        name="two a minute", requests_per_minute=2, tokens_per_minute=1
    )
    alice.tenant.save(update_fields=["plan"])

    first = post(alice, "/tokenize", {"inputs": "many words here"})
    second = post(alice, "/decode", {"ids": [1, 2, 3]})
    third = post(alice, "/tokenize", {"inputs": "a"})

    # One token a minute does not stop them: they spend no tokens.
    assert (first.status_code, second.status_code) == (200, 200)
    assert first["x-ratelimit-remaining-requests"] == "1"
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(third["Retry-After"]) >= 1
