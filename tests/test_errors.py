"""The catalogue of error codes (embedplatform/error_codes.py) is the one list of what the API
can answer: every code raised in the source is in it, with the message it is raised with; real
requests get exactly the catalogued status, type and wording; and the OpenAPI document's error
examples are the catalogue's own."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.jwt import mint_token
from accounts.models import Tenant
from embedplatform.error_codes import CATALOGUE, ERROR_TYPES, FIELD_PREFIX
from embedplatform.errors import openai_status
from embedplatform.http_errors import CODE_BY_STATUS
from tests.conftest import FakeEncoder, Person

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("accounts", "embeddings", "embedplatform")
# Stands for an f-string's {expression} in a raise site's message.
HOLE = "\x00"


@dataclass(frozen=True)
class RaiseSite:
    where: str
    code: str
    message: str | None  # None when the message is not a literal at the site


def _literal(node: ast.AST | None) -> str | None:
    """A message literal, with each f-string expression replaced by HOLE."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                parts.append(HOLE)
        return "".join(parts)
    return None


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def raise_sites() -> list[RaiseSite]:
    """Every error code the source raises with a literal: `code="..."` keywords, `_reject(msg,
    "code")`-style helpers, and serializer fields' `default_error_messages`."""
    sites = []
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            relative = path.relative_to(ROOT)
            for node in ast.walk(tree):
                where = f"{relative}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Call):
                    strings = [arg for arg in node.args if _literal(arg) is not None]
                    message = _literal(strings[0]) if strings else None
                    for keyword in node.keywords:
                        if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                            sites.append(RaiseSite(where, str(keyword.value.value), message))
                    if "reject" in _callee(node) and len(node.args) == 2:
                        code = node.args[1]
                        if isinstance(code, ast.Constant) and isinstance(code.value, str):
                            sites.append(RaiseSite(where, code.value, _literal(node.args[0])))
                if isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [getattr(target, "id", "") for target in targets]
                    if "default_error_messages" in names and isinstance(node.value, ast.Dict):
                        for key, value in zip(node.value.keys, node.value.values, strict=True):
                            if isinstance(key, ast.Constant):
                                sites.append(RaiseSite(where, str(key.value), _literal(value)))
    return sites


def site_matches_template(message: str, template_message: str) -> bool:
    """Whether a site's literal (HOLE for each f-string expression) can produce the catalogue's
    example wording; a field error's literal lacks the "<param>: " the handler adds."""
    pattern = re.compile(".+".join(re.escape(part) for part in message.split(HOLE)), re.DOTALL)
    return bool(pattern.fullmatch(template_message))


def example_wordings(code: str) -> list[str]:
    entry = CATALOGUE[code]
    values = {"param": "param", "position": 0, **entry.example}
    wordings = []
    for template in entry.messages:
        wordings.append(template.format(**values))
        wordings.append(template.removeprefix(FIELD_PREFIX).format(**values))
    return wordings


def test_it_finds_the_raise_sites_it_checks() -> None:
    codes = {site.code for site in raise_sites()}

    # A sample of each form, so a broken scan cannot pass by finding nothing.
    assert {"token_expired", "invalid_api_key", "too_many_inputs", "empty_text"} <= codes


def test_it_catalogues_every_error_code_raised_in_the_source() -> None:
    missing = [f"{site.where}: {site.code}" for site in raise_sites() if site.code not in CATALOGUE]

    assert missing == [], "add these codes to embedplatform/error_codes.py"


def test_it_raises_each_code_with_a_catalogued_message() -> None:
    drifted = [
        f"{site.where}: {site.code}: {site.message!r}"
        for site in raise_sites()
        if site.code in CATALOGUE
        and site.message is not None
        and not any(site_matches_template(site.message, w) for w in example_wordings(site.code))
    ]

    assert drifted == [], "make these messages and embedplatform/error_codes.py agree"


def test_it_gives_every_catalogued_code_a_valid_example() -> None:
    for code, entry in CATALOGUE.items():
        body = entry.example_body()
        assert entry.matches(body), code
        assert entry.type in ERROR_TYPES, code
        assert 400 <= entry.status < 600, code
        assert entry.title, code


@pytest.fixture
def limited_alice(alice: Person) -> Person:
    Tenant.objects.filter(pk=alice.tenant.pk).update(monthly_token_quota=5)
    return alice


def post(path: str, body: Any, headers: dict[str, Any], content_type: str = "") -> Any:
    data = body if isinstance(body, str) else json.dumps(body)
    return Client().post(path, data, content_type=content_type or "application/json", **headers)


def test_it_answers_real_requests_exactly_as_catalogued(
    alice: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    auth = alice.client_headers
    expired = mint_token(subject=alice.subject, email=alice.email, lifetime_seconds=-3600)
    cases: list[tuple[str, Any]] = [
        ("missing_credentials", post("/embed", {"text": "hi"}, {})),
        (
            "token_expired",
            post("/embed", {"text": "hi"}, {"HTTP_AUTHORIZATION": f"Bearer {expired}"}),
        ),
        (
            "malformed_token",
            post("/embed", {"text": "hi"}, {"HTTP_AUTHORIZATION": "Bearer not-a-jwt"}),
        ),
        (
            "not_a_member",
            post("/embed", {"text": "hi"}, {**auth, "HTTP_X_TENANT": str(charlie.tenant.pk)}),
        ),
        ("invalid_json", post("/embed", "{not json", auth)),
        ("invalid_body", post("/embed", "[1, 2]", auth)),
        ("unsupported_media_type", post("/embed", "text=hi", auth, "text/plain")),
        ("empty_text", post("/embed", {"text": "   "}, auth)),
        ("empty_text", post("/embed", {"text": ""}, auth)),
        ("empty_text", post("/batch-embed", {"texts": ["a", " "]}, auth)),
        ("invalid", post("/embed", {"text": 5}, auth)),
        ("required", post("/embed", {}, auth)),
        ("invalid_dimensions", post("/embed", {"text": "hi", "dimensions": 4096}, auth)),
        ("invalid_prompt_name", post("/embed", {"text": "hi", "prompt_name": "qa"}, auth)),
        ("too_many_inputs", post("/batch-embed", {"texts": ["a"] * 300}, auth)),
        ("model_not_found", post("/v1/embeddings", {"input": "a", "model": "gpt-4"}, auth)),
        ("invalid_token_id", post("/v1/embeddings", {"input": [[1, 10**6]]}, auth)),
        ("mixed", post("/v1/embeddings", {"input": ["a", [1]]}, auth)),
        ("not_found", Client().get("/no-such-endpoint")),
    ]
    for code, response in cases:
        entry = CATALOGUE[code]
        body = response.json()
        expected = entry.status
        if response.request["PATH_INFO"].startswith("/v1/"):
            expected = openai_status(entry.status, body)  # OpenAI's 400 for invalid requests
        assert (response.status_code, entry.matches(body)) == (expected, True), (code, body)


def test_it_answers_invalid_openai_requests_with_400_and_the_original_api_with_422(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    auth = alice.client_headers
    original = post("/batch-embed", {"texts": ["a", ""]}, auth)
    openai = post("/v1/embeddings", {"input": ["a", ""]}, auth)
    too_many_original = post("/batch-embed", {"texts": ["a"] * 300}, auth)
    too_many_openai = post("/embeddings", {"input": ["a"] * 2049}, auth)

    assert (original.status_code, openai.status_code) == (422, 400)
    assert original.json()["error"]["code"] == openai.json()["error"]["code"] == "empty_text"
    assert (too_many_original.status_code, too_many_openai.status_code) == (413, 400)
    assert too_many_openai.json()["error"] == {
        "message": "A request may carry at most 2048 texts; this one has 2049.",
        "type": "invalid_request_error",
        "param": "input",
        "code": "too_many_inputs",
    }


def test_it_answers_quota_and_readiness_errors_as_catalogued(
    limited_alice: Person, fake_encoder: FakeEncoder
) -> None:
    quota = post("/embed", {"text": "one two three four five six"}, limited_alice.client_headers)

    assert quota.status_code == 429
    assert CATALOGUE["insufficient_quota"].matches(quota.json()), quota.json()


def test_it_answers_not_ready_as_catalogued(alice: Person) -> None:
    embed = post("/embed", {"text": "hi"}, alice.client_headers)
    health = Client().get("/health")

    assert embed.status_code == health.status_code == 503
    assert CATALOGUE["model_not_ready"].matches(embed.json())
    assert CATALOGUE["not_ready"].matches(health.json())
    assert health.json()["error"]["message"] == "Not ready: model."


def test_it_documents_only_the_catalogues_examples(db: None, fake_encoder: FakeEncoder) -> None:
    schema = json.loads(Client().get("/openapi.json").content)

    examples = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    values = [e["value"] for e in media.get("examples", {}).values()]
                    values += [media["example"]] if "example" in media else []
                    for value in values:
                        if isinstance(value, dict) and "error" in value:
                            examples.append((f"{method} {path} {status}", value))
    assert len(examples) > 50
    for where, value in examples:
        entry = CATALOGUE[value["error"]["code"]]
        status = entry.status
        if " /v1/" in where or " /embeddings " in where:
            status = openai_status(status, value)  # OpenAI's API: 400 for invalid requests
        assert str(status) == where.rsplit(" ", 1)[1], where
        assert value["error"] == entry.example_body()["error"], where


def test_it_catalogues_each_refusal_of_gunicorn_under_the_status_gunicorn_sends() -> None:
    for status, code in CODE_BY_STATUS.items():
        assert CATALOGUE[code].status == status, code
        assert CATALOGUE[code].matches(CATALOGUE[code].body(reason="x")), code
