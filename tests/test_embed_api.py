"""The embed APIs in-process: contracts, validation and the error shape.

The validation tests use the fake encoder (they are about the code around the model); the text
handling tests (Korean, emoji, NUL, prompts, Matryoshka) run the real MiniLM and the tiny
EmbeddingGemma-architecture model.

Long (about 520 lines) because it is the API's contract, one short test per rule; the rules of
other concerns (truncation, limits, tokenize, clients) live in their own files.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from django.test import Client

from accounts.models import UsageLog
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

ENDPOINTS = {
    "embed": ("/embed", lambda texts: {"text": texts[0]}),
    "batch": ("/batch-embed", lambda texts: {"texts": texts}),
    "openai": ("/v1/embeddings", lambda texts: {"input": texts}),
}


def post(person: Person, path: str, body: Any, *, raw: bytes | None = None, **extra: Any) -> Any:
    client = Client()
    content = raw if raw is not None else json.dumps(body)
    content_type = extra.pop("content_type", "application/json")
    return client.post(path, content, content_type=content_type, **person.client_headers, **extra)


def vector(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# --- Contracts ---------------------------------------------------------------------------------


def test_it_embeds_one_text(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(alice, "/embed", {"text": "hello world"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"embedding", "model", "dimensions", "truncated", "usage"}
    assert body["truncated"] is False
    assert response["x-truncated-inputs"] == "0"
    assert body["model"] == "fake-model"
    assert body["dimensions"] == len(body["embedding"]) == 16
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert np.linalg.norm(vector(body["embedding"])) == pytest.approx(1.0, abs=1e-5)


def test_it_embeds_a_batch_in_the_order_given(alice: Person, fake_encoder: FakeEncoder) -> None:
    texts = ["첫 번째", "두 번째", "세 번째"]
    body = post(alice, "/batch-embed", {"texts": texts}).json()
    assert len(body["embeddings"]) == 3
    singles = [post(alice, "/embed", {"text": t}).json()["embedding"] for t in texts]
    np.testing.assert_allclose(body["embeddings"], singles, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(len(t.split()) + 2 for t in texts)


def test_it_answers_the_openai_shape(alice: Person, fake_encoder: FakeEncoder) -> None:
    body = post(alice, "/v1/embeddings", {"input": ["a b", "c"], "model": "fake-model"}).json()
    assert body["object"] == "list"
    assert body["model"] == "fake-model"
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in body["data"])
    assert body["usage"] == {"prompt_tokens": 4 + 3, "total_tokens": 7}


def test_it_encodes_base64_as_little_endian_float32(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    floats = post(alice, "/v1/embeddings", {"input": "same text"}).json()["data"][0]["embedding"]
    encoded = post(alice, "/v1/embeddings", {"input": "same text", "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(encoded.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, rtol=1e-6)


def test_it_serves_openai_on_the_path_without_v1(alice: Person, fake_encoder: FakeEncoder) -> None:
    assert post(alice, "/embeddings", {"input": "x"}).json()["object"] == "list"


def test_it_reads_token_id_inputs_with_the_models_tokenizer(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.TOKEN_ID_INPUT = "native"  # tiktoken ids (the default): tests/test_token_inputs.py
    by_ids = post(alice, "/v1/embeddings", {"input": [[1, 2], [3]]}).json()
    by_text = post(alice, "/v1/embeddings", {"input": ["t1 t2", "t3"]}).json()
    for a, b in zip(by_ids["data"], by_text["data"], strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"])
    single = post(alice, "/v1/embeddings", {"input": [1, 2]}).json()
    np.testing.assert_allclose(single["data"][0]["embedding"], by_text["data"][0]["embedding"])


def test_it_truncates_to_matryoshka_dimensions_and_renormalizes(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    full = vector(post(alice, "/embed", {"text": "x y"}).json()["embedding"])
    body = post(alice, "/embed", {"text": "x y", "dimensions": 4}).json()
    short = vector(body["embedding"])
    assert body["dimensions"] == 4
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(short, full[:4] / np.linalg.norm(full[:4]), rtol=1e-5)


def test_it_leaves_truncated_vectors_unnormalized_on_request(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    full = vector(post(alice, "/embed", {"text": "x y"}).json()["embedding"])
    raw = post(alice, "/embed", {"text": "x y", "dimensions": 4, "normalize": False}).json()
    np.testing.assert_allclose(raw["embedding"], full[:4], rtol=1e-5)


def test_it_applies_the_named_prompt(alice: Person, fake_encoder: FakeEncoder) -> None:
    plain = post(alice, "/embed", {"text": "x"}).json()
    query = post(alice, "/embed", {"text": "x", "prompt_name": "query"}).json()
    assert plain["embedding"] != query["embedding"]
    assert query["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 1


# --- Validation: every bad input is a documented 4xx ----------------------------------------------

BAD_BODIES = [
    ("embed-empty", "/embed", {"text": ""}, 422, "text", "empty_text"),
    ("embed-whitespace", "/embed", {"text": " \n\t "}, 422, "text", "empty_text"),
    ("embed-number", "/embed", {"text": 123}, 422, "text", "invalid"),
    ("embed-null", "/embed", {"text": None}, 422, "text", "null"),
    ("embed-list", "/embed", {"text": ["a"]}, 422, "text", "invalid"),
    ("embed-missing", "/embed", {}, 422, "text", "required"),
    (
        "embed-bool-normalize",
        "/embed",
        {"text": "a", "normalize": "yes"},
        422,
        "normalize",
        "invalid",
    ),
    (
        "embed-string-dimensions",
        "/embed",
        {"text": "a", "dimensions": "8"},
        422,
        "dimensions",
        "invalid",
    ),
    (
        "embed-zero-dimensions",
        "/embed",
        {"text": "a", "dimensions": 0},
        422,
        "dimensions",
        "min_value",
    ),
    (
        "embed-huge-dimensions",
        "/embed",
        {"text": "a", "dimensions": 17},
        422,
        "dimensions",
        "invalid_dimensions",
    ),
    (
        "embed-unknown-prompt",
        "/embed",
        {"text": "a", "prompt_name": "nope"},
        422,
        "prompt_name",
        "invalid_prompt_name",
    ),
    ("batch-empty-list", "/batch-embed", {"texts": []}, 422, "texts", "empty"),
    ("batch-not-list", "/batch-embed", {"texts": "a"}, 422, "texts", "not_a_list"),
    ("batch-empty-item", "/batch-embed", {"texts": ["a", ""]}, 422, "texts[1]", "empty_text"),
    ("batch-null-item", "/batch-embed", {"texts": ["a", None]}, 422, "texts[1]", "null"),
    ("batch-number-item", "/batch-embed", {"texts": ["a", 5]}, 422, "texts[1]", "invalid"),
    ("openai-empty-string", "/v1/embeddings", {"input": ""}, 400, "input", "empty_text"),
    ("openai-empty-list", "/v1/embeddings", {"input": []}, 400, "input", "empty"),
    ("openai-null", "/v1/embeddings", {"input": None}, 400, "input", "null"),
    ("openai-object", "/v1/embeddings", {"input": {"a": 1}}, 400, "input", "invalid"),
    ("openai-mixed", "/v1/embeddings", {"input": ["a", [1]]}, 400, "input", "mixed"),
    ("openai-negative-id", "/v1/embeddings", {"input": [-1]}, 400, "input", "invalid"),
    (
        "openai-id-out-of-vocab",
        "/v1/embeddings",
        {"input": [[5, 100256]]},  # no cl100k_base token has this id
        400,
        "input",
        "invalid_token_id",
    ),
    (
        "openai-bad-format",
        "/v1/embeddings",
        {"input": "a", "encoding_format": "int8"},
        400,
        "encoding_format",
        "invalid_choice",
    ),
    (
        "openai-unknown-model",
        "/v1/embeddings",
        {"input": "a", "model": "text-embedding-3-small"},
        404,
        "model",
        "model_not_found",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_it_refuses_bad_input_with_the_error_shape(
    alice: Person,
    fake_encoder: FakeEncoder,
    path: str,
    body: Any,
    status: int,
    param: str,
    code: str,
) -> None:
    response = post(alice, path, body)
    error = assert_error(response, status, code=code, param=param)
    assert error["type"] in {"invalid_request_error", "not_found_error"}
    assert fake_encoder.texts_encoded == 0
    row = UsageLog.objects.get(request_id=response["x-request-id"])
    assert (row.status_code, row.tokens, row.tenant_id) == (status, 0, alice.tenant.pk)


@pytest.mark.parametrize("path", ["/embed", "/batch-embed", "/v1/embeddings"])
def test_it_refuses_invalid_json_as_malformed(
    alice: Person, fake_encoder: FakeEncoder, path: str
) -> None:
    assert_error(post(alice, path, None, raw=b'{"text": "a",'), 400, code="invalid_json")


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"null", b"42"])
def test_it_refuses_a_body_that_is_not_an_object(
    alice: Person, fake_encoder: FakeEncoder, raw: bytes
) -> None:
    assert_error(post(alice, "/embed", None, raw=raw), 400, code="invalid_body")


def test_it_refuses_json_with_nan(alice: Person, fake_encoder: FakeEncoder) -> None:
    assert_error(post(alice, "/embed", None, raw=b'{"text": "a", "dimensions": NaN}'), 400)


def test_it_refuses_a_body_that_is_not_utf8(alice: Person, fake_encoder: FakeEncoder) -> None:
    assert_error(
        post(alice, "/embed", None, raw=b'{"text": "\xff\xfe"}'), 400, code="invalid_encoding"
    )


def test_it_refuses_other_media_types(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(
        alice, "/embed", None, raw=b"text=a", content_type="application/x-www-form-urlencoded"
    )
    assert_error(response, 415, code="unsupported_media_type")


def test_it_refuses_a_lone_surrogate(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(alice, "/embed", None, raw=b'{"text": "broken \\ud800 text"}')
    assert_error(response, 422, code="surrogate_characters_not_allowed", param="text")


def test_it_refuses_more_texts_than_allowed_with_413(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.MAX_TEXTS_PER_REQUEST = 5
    response = post(alice, "/batch-embed", {"texts": ["a"] * 6})
    assert_error(response, 413, code="too_many_inputs", param="texts")
    assert fake_encoder.texts_encoded == 0
    assert post(alice, "/batch-embed", {"texts": ["a"] * 5}).status_code == 200


def test_it_applies_the_default_limit_of_256_texts(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    assert_error(post(alice, "/batch-embed", {"texts": ["a"] * 257}), 413, code="too_many_inputs")


def test_it_refuses_a_body_over_the_upload_limit_with_413(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = post(alice, "/embed", {"text": "word " * 500})
    assert_error(response, 413, code="request_too_large")
    assert fake_encoder.texts_encoded == 0


def test_it_answers_405_for_the_wrong_method(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = Client().get("/embed", **alice.client_headers)
    assert_error(response, 405, code="method_not_allowed")


def test_it_answers_unknown_paths_with_a_json_404() -> None:
    assert_error(Client().get("/no/such/thing"), 404, error_type="not_found_error")


@pytest.mark.parametrize(
    "path", ["/embed", "/batch-embed", "/v1/embeddings", "/embeddings", "/usage"]
)
def test_it_answers_nothing_without_a_credential(
    path: str, fake_encoder: FakeEncoder, db: None
) -> None:
    response = Client().post(path, "{}", content_type="application/json")
    if path == "/usage":
        response = Client().get(path)
    error = assert_error(response, 401, error_type="authentication_error")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert error["code"] == "missing_credentials"
    assert UsageLog.objects.count() == 0


def test_it_answers_503_until_the_model_is_loaded(alice: Person) -> None:
    response = post(alice, "/embed", {"text": "a"})
    assert_error(response, 503, error_type="service_unavailable", code="model_not_ready")


def test_it_turns_an_unexpected_model_failure_into_a_json_500(
    alice: Person, fake_encoder: FakeEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(texts: list[str], prompt: str) -> np.ndarray:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(fake_encoder, "encode", explode)
    from embeddings import runtime

    runtime.install_runtime(fake_encoder)
    response = post(alice, "/embed", {"text": "a"})
    error = assert_error(response, 500, error_type="server_error")
    assert "secret" not in error["message"]
    row = UsageLog.objects.get(request_id=response["x-request-id"])
    assert (row.status_code, row.tokens) == (500, 0)


# --- Real models: any text a user may send -------------------------------------------------------

TEXTS = {
    "korean": "안녕하세요, 반갑습니다!",
    "emoji": "I love this 😍🔥👍🏽 family: 👨‍👩‍👧",
    "mixed": "Tokyo 東京, Москва, القاهرة and 서울 in one line",
    "nul": "before\x00after",
    "controls": "tab\tnew\nline\rreturn",
    "long": "word " * 5000,
}


@pytest.mark.parametrize("model_fixture", ["minilm", "gemma"])
@pytest.mark.parametrize("name", list(TEXTS))
def test_it_embeds_any_text_with_the_real_models(
    alice: Person, request: pytest.FixtureRequest, model_fixture: str, name: str
) -> None:
    encoder = request.getfixturevalue(model_fixture)
    response = post(alice, "/embed", {"text": TEXTS[name]})
    assert response.status_code == 200, response.content
    body = response.json()
    values = vector(body["embedding"])
    assert values.shape == (encoder.dimensions,)
    assert np.isfinite(values).all()
    assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-4)
    assert 0 < body["usage"]["prompt_tokens"] <= encoder.max_seq_length


def test_it_counts_only_the_tokens_actually_used_for_long_texts(alice: Person, minilm: Any) -> None:
    body = post(alice, "/embed", {"text": "word " * 5000}).json()
    assert body["usage"]["prompt_tokens"] == minilm.max_seq_length


def test_it_gives_the_same_vector_alone_and_in_a_batch(alice: Person, minilm: Any) -> None:
    texts = ["a short one", "a considerably longer sentence about embeddings and tenants", "중간"]
    batch = post(alice, "/batch-embed", {"texts": texts}).json()["embeddings"]
    for text, row in zip(texts, batch, strict=True):
        alone = post(alice, "/embed", {"text": text}).json()["embedding"]
        assert float(np.dot(alone, row)) > 0.9999


def test_it_places_similar_sentences_closer_than_unrelated_ones(alice: Person, minilm: Any) -> None:
    texts = [
        "The cat sits on the mat.",
        "A cat is sitting on a mat.",
        "Stock markets fell sharply.",
    ]
    a, b, c = (
        vector(v) for v in post(alice, "/batch-embed", {"texts": texts}).json()["embeddings"]
    )
    assert float(a @ b) > float(a @ c) + 0.3


@pytest.mark.parametrize(
    "prompt_name", ["query", "document", "Clustering", "STS", "Retrieval-document"]
)
def test_it_serves_embeddinggemmas_prompts(alice: Person, gemma: Any, prompt_name: str) -> None:
    plain = post(alice, "/embed", {"text": "What is the capital of France?"}).json()
    prompted = post(
        alice, "/embed", {"text": "What is the capital of France?", "prompt_name": prompt_name}
    )
    assert prompted.status_code == 200
    body = prompted.json()
    prompt_tokens = len(
        gemma.model.tokenizer(gemma.prompts[prompt_name], add_special_tokens=False)["input_ids"]
    )
    assert body["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + prompt_tokens
    assert float(np.dot(plain["embedding"], body["embedding"])) < 0.9999


@pytest.mark.parametrize("fraction", [1, 2, 4, 6, 0])
def test_it_truncates_gemma_to_matryoshka_sizes(alice: Person, gemma: Any, fraction: int) -> None:
    # Cuts like the real model's 768/512/256/128, relative to the tiny width; 0 means one dim.
    dimensions = gemma.dimensions // fraction if fraction else 1
    full = vector(post(alice, "/embed", {"text": "Matryoshka"}).json()["embedding"])
    body = post(alice, "/embed", {"text": "Matryoshka", "dimensions": dimensions}).json()
    short = vector(body["embedding"])
    assert body["dimensions"] == short.shape[0] == dimensions
    assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-4)
    expected = full[:dimensions] / np.linalg.norm(full[:dimensions])
    np.testing.assert_allclose(short, expected, atol=1e-5)


def test_it_refuses_more_dimensions_than_gemma_has(alice: Person, gemma: Any) -> None:
    response = post(alice, "/embed", {"text": "x", "dimensions": gemma.dimensions + 1})
    assert_error(response, 422, code="invalid_dimensions", param="dimensions")


# --- Edges of the HTTP layer ----------------------------------------------------------------------


def test_it_does_not_meter_an_options_request(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = Client().options("/embed", **alice.client_headers)
    assert response.status_code == 200
    assert UsageLog.objects.count() == 0
    assert "x-ratelimit-limit-requests" not in response


@pytest.mark.parametrize(
    ("credential", "extra"),
    [
        ("Bearer emb_garbage", {"HTTP_ACCEPT": "application/xml"}),
        ("Bearer not.a.jwt", {"HTTP_ACCEPT": "application/xml"}),
        ("Bearer not.a.jwt", {"QUERY_STRING": "format=xml"}),
    ],
)
def test_it_refuses_a_bad_credential_with_an_unknown_format_without_a_500(
    credential: str, extra: dict[str, Any], fake_encoder: FakeEncoder, db: None
) -> None:
    response = Client().post(
        "/embed", "{}", content_type="application/json", HTTP_AUTHORIZATION=credential, **extra
    )
    assert 400 <= response.status_code < 500
    assert UsageLog.objects.count() == 0


def test_it_refuses_deeply_nested_json_as_malformed(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    raw = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(post(alice, "/embed", None, raw=raw), 400, code="invalid_json")


def test_it_names_the_model_in_the_usage_row_of_a_refused_request(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    response = post(alice, "/batch-embed", {"texts": ["a", ""]})
    row = UsageLog.objects.get(request_id=response["x-request-id"])
    assert (row.status_code, row.model) == (422, "fake-model")


@pytest.mark.parametrize("supplied", ["trace\n", "a b", "x" * 129, "é"])
def test_it_replaces_a_request_id_it_cannot_echo_safely(
    alice: Person, fake_encoder: FakeEncoder, supplied: str
) -> None:
    response = post(alice, "/embed", {"text": "a"}, HTTP_X_REQUEST_ID=supplied)
    assert response.status_code == 200
    assert response["x-request-id"] != supplied
    assert len(response["x-request-id"]) == 32


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_it_answers_probes_that_address_it_by_ip(
    fake_encoder: FakeEncoder, db: None, path: str
) -> None:
    # Prometheus (DNS discovery) and container health checks send Host: <ip>:8000.
    response = Client().get(path, HTTP_HOST="172.18.0.3:8000")
    assert response.status_code == 200


def test_it_still_checks_the_host_of_the_api(alice: Person, fake_encoder: FakeEncoder) -> None:
    response = post(alice, "/embed", {"text": "a"}, HTTP_HOST="evil.example.com")
    assert_error(response, 400, code="bad_request")


@pytest.mark.parametrize("credential", ["jwt", "api_key"])
def test_it_costs_one_query_per_request_once_the_caller_is_known(
    alice: Person,
    fake_encoder: FakeEncoder,
    settings: Any,
    credential: str,
    django_assert_num_queries: Any,
) -> None:
    """With the production caches on, a served request is one statement (charge and usage row
    together) and a refused one is one INSERT (its usage row): identity, tenant, plan and the
    quota pre-check come from memory."""
    from accounts import services

    settings.AUTH_CACHE_SECONDS = 5
    settings.QUOTA_PRECHECK_CACHE_SECONDS = 5
    headers = dict(alice.client_headers)
    if credential == "api_key":
        _, key = services.create_api_key(tenant=alice.tenant, name="ci")
        headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"}

    def send(body: Any) -> Any:
        return Client().post("/v1/embeddings", body, content_type="application/json", **headers)

    assert send({"input": "warm up"}).status_code == 200  # the month's row, last-seen stamps
    with django_assert_num_queries(1):
        assert send({"input": "hello world"}).status_code == 200
    with django_assert_num_queries(1):
        assert send({"input": ""}).status_code == 400
    assert UsageLog.objects.count() == 3
