"""The API's OpenAPI description (/openapi.json) and its two readers, Swagger UI (/docs) and ReDoc
(/redoc): valid, complete (every endpoint, field, error, header and credential), true to what the
service answers, and served without a credential or any CDN."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from django.core.management import call_command
from django.test import Client
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from embedplatform import error_codes
from tests.headless_chromium import chromium, requested_urls

EMBED_ERRORS = {"400", "401", "403", "413", "415", "422", "429", "503"}
# OpenAI's API answers invalid requests with 400 (the original's 422); 413 is a body too large.
OPENAI_ERRORS = {"400", "401", "403", "404", "413", "415", "429", "503"}
OPERATIONS = [
    # path, method, security schemes, error statuses
    ("/embed", "post", {"bearerAuth", "staffSession"}, EMBED_ERRORS),
    ("/batch-embed", "post", {"bearerAuth", "staffSession"}, EMBED_ERRORS),
    ("/v1/embeddings", "post", {"bearerAuth", "staffSession"}, OPENAI_ERRORS),
    ("/embeddings", "post", {"bearerAuth", "staffSession"}, OPENAI_ERRORS),
    ("/tokenize", "post", {"bearerAuth", "staffSession"}, EMBED_ERRORS),
    ("/decode", "post", {"bearerAuth", "staffSession"}, EMBED_ERRORS),
    ("/usage", "get", {"bearerAuth", "staffSession"}, {"401", "403"}),
    ("/health", "get", set(), {"503"}),
    ("/metrics", "get", {"metricsToken"}, {"401"}),
]
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
}


@pytest.fixture
def schema(db: None) -> dict[str, Any]:
    response = Client().get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = json.loads(response.content)
    return document


def error_validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    """Validates a body against the documented Error component (OpenAPI 3.0's `nullable`
    spelled as JSON Schema)."""

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            node = {key: convert(value) for key, value in node.items()}
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            if "$ref" in node:
                node["$ref"] = node["$ref"].replace("#/components/schemas/", "#/definitions/")
            return node
        if isinstance(node, list):
            return [convert(item) for item in node]
        return node

    definitions = convert(schema["components"]["schemas"])
    return jsonschema.Draft7Validator({"$ref": "#/definitions/Error", "definitions": definitions})


def test_it_validates_with_no_warning_and_no_error(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()

    call_command(
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--format",
        "openapi-json",
        "--file",
        str(tmp_path / "openapi.json"),
        stdout=out,
        stderr=err,
    )

    assert "Warning" not in err.getvalue() + out.getvalue()
    assert "Error" not in err.getvalue() + out.getvalue()
    written = json.loads((tmp_path / "openapi.json").read_text())
    assert written["openapi"].startswith("3.")
    assert set(written["paths"]) >= {path for path, *_ in OPERATIONS}


def test_it_serves_the_schema_as_json_to_anyone(db: None) -> None:
    anonymous = Client().get("/openapi.json")
    stale_token = Client().get("/openapi.json", HTTP_AUTHORIZATION="Bearer expired.or.wrong")

    for response in (anonymous, stale_token):
        assert response.status_code == 200
        assert "json" in response["Content-Type"]
        assert json.loads(response.content)["info"]["title"] == "embedplatform API"


@pytest.mark.parametrize(("path", "method", "security", "errors"), OPERATIONS)
def test_it_documents_each_endpoint_with_its_security_and_every_error(
    schema: dict[str, Any], path: str, method: str, security: set[str], errors: set[str]
) -> None:
    operation = schema["paths"][path][method]

    assert operation["summary"]
    assert operation["description"]
    assert operation["tags"]
    documented = {name for requirement in operation["security"] for name in requirement}
    assert documented == security
    anonymous_allowed = {} in operation["security"]
    assert anonymous_allowed == (path in ("/health", "/metrics"))
    assert "200" in operation["responses"]
    assert errors <= set(operation["responses"])
    for status in errors:
        response = operation["responses"][status]
        assert response["description"]
        content = response["content"]["application/json"]
        assert content["schema"]["$ref"] in (
            "#/components/schemas/Error",
            "#/components/schemas/Health",
        )
    for status in errors - {"503"} if path == "/health" else errors:
        content = operation["responses"][status]["content"]["application/json"]
        examples = [item["value"] for item in content.get("examples", {}).values()]
        examples += [content["example"]] if "example" in content else []
        assert examples, f"{method} {path} {status} has no example"
        for example in examples:
            error_validator(schema).validate(example)
            assert example["error"]["type"] in error_codes.ERROR_TYPES


def test_it_documents_every_request_and_response_field(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]

    assert set(components["EmbedInput"]["properties"]) == {
        "text",
        "prompt_name",
        "dimensions",
        "normalize",
        "truncate",
        "truncation_direction",
    }
    assert components["EmbedInput"]["required"] == ["text"]
    assert components["TruncationDirectionEnum"]["enum"] == ["right", "left"]
    assert components["BatchEmbedInput"]["properties"]["texts"]["type"] == "array"
    openai_input = components["OpenAIEmbeddingInput"]["properties"]["input"]
    assert len(openai_input["oneOf"]) == 4  # string, strings, token ids, token-id arrays
    assert set(components["EmbedOutput"]["properties"]) == {
        "embedding",
        "model",
        "dimensions",
        "truncated",
        "usage",
    }
    assert components["BatchEmbedOutput"]["properties"]["truncated"]["type"] == "array"
    embedding = components["OpenAIEmbedding"]["properties"]["embedding"]
    assert {alternative["type"] for alternative in embedding["oneOf"]} == {"array", "string"}
    assert components["EncodingFormatEnum"]["enum"] == ["float", "base64"]
    for name, component in components.items():
        for field, spec in component.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} is not described"
    assert set(components["UsageSummary"]["properties"]) == {"tenant", "plan", "period", "daily"}
    assert "checks" in components["Health"]["properties"]


def test_it_describes_the_one_error_shape(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]

    assert components["Error"]["required"] == ["error"]
    detail = components["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    assert detail["properties"]["param"]["nullable"] is True
    assert set(components["ErrorTypeEnum"]["enum"]) == set(error_codes.ERROR_TYPES)


def test_it_describes_both_bearer_credentials_and_the_staff_session(
    schema: dict[str, Any],
) -> None:
    schemes = schema["components"]["securitySchemes"]

    bearer = schemes["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert "Supabase" in bearer["description"]
    assert "API key" in bearer["description"]
    assert "X-Tenant" in bearer["description"]
    session = schemes["staffSession"]
    assert (session["type"], session["in"], session["name"]) == ("apiKey", "cookie", "sessionid")
    assert "/admin/login/" in session["description"]
    assert "CSRF" in session["description"]
    assert schemes["metricsToken"]["scheme"] == "bearer"


@pytest.mark.parametrize("path", ["/embed", "/batch-embed", "/v1/embeddings", "/embeddings"])
def test_it_documents_the_headers_of_the_embed_endpoints(schema: dict[str, Any], path: str) -> None:
    operation = schema["paths"][path]["post"]

    request_headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    assert {"X-Tenant", "X-Request-ID"} <= request_headers
    for status in ("200", "429"):
        headers = set(operation["responses"][status]["headers"])
        assert headers >= RATE_LIMIT_HEADERS | {"x-request-id"}, status
    assert "Retry-After" in operation["responses"]["429"]["headers"]
    assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    for status, response in operation["responses"].items():
        assert "x-request-id" in response["headers"], status


def test_it_shows_the_original_services_examples_and_openai_style_ones(
    schema: dict[str, Any],
) -> None:
    def request_examples(path: str) -> list[Any]:
        content = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        return [example["value"] for example in content["examples"].values()]

    assert {"text": "안녕하세요, 반갑습니다!"} in request_examples("/embed")
    assert {"texts": ["첫 번째", "두 번째", "세 번째"]} in request_examples("/batch-embed")
    openai_examples = request_examples("/v1/embeddings")
    assert any(example.get("encoding_format") == "base64" for example in openai_examples)
    assert all("model" in example for example in openai_examples)


def test_it_names_the_served_model_in_the_openai_examples(db: None, fake_encoder: Any) -> None:
    schema = json.loads(Client().get("/openapi.json").content)

    content = schema["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    models = {
        example["value"]["model"] for example in content["application/json"]["examples"].values()
    }
    assert models == {"fake-model"}


def test_it_answers_errors_in_the_documented_shape_and_statuses(
    schema: dict[str, Any], alice: Any, fake_encoder: Any
) -> None:
    client = Client()
    auth = alice.client_headers
    cases = [
        ("/embed", {"text": "hi"}, "application/json", {}),  # 401: no credential
        ("/embed", {"text": "hi"}, "application/json", {"HTTP_AUTHORIZATION": "Bearer x.y.z"}),
        ("/embed", "{not json", "application/json", auth),  # 400
        ("/embed", "[1, 2]", "application/json", auth),  # 400: not an object
        ("/embed", {"text": "  "}, "application/json", auth),  # 422
        ("/embed", {"text": "hi", "dimensions": 4096}, "application/json", auth),  # 422
        ("/embed", "text=hi", "text/plain", auth),  # 415
        ("/embed", {"text": "hi"}, "application/json", {**auth, "HTTP_X_TENANT": "999999"}),
        ("/batch-embed", {"texts": ["a"] * 300}, "application/json", auth),  # 413
        ("/v1/embeddings", {"input": "a", "model": "gpt-4"}, "application/json", auth),  # 404
        ("/v1/embeddings", {"input": "  "}, "application/json", auth),  # 400 (OpenAI's)
        ("/v1/embeddings", {"input": ["a"] * 2049}, "application/json", auth),  # 400 (OpenAI's)
    ]
    validator = error_validator(schema)
    seen = set()
    for path, body, content_type, headers in cases:
        data = body if isinstance(body, str) else json.dumps(body)
        response = client.post(path, data=data, content_type=content_type, **headers)
        status = str(response.status_code)
        seen.add(status)
        assert status in schema["paths"][path]["post"]["responses"], (path, body, status)
        validator.validate(response.json())
        assert response["x-request-id"]
    assert seen == {"400", "401", "403", "404", "413", "415", "422"}
    assert fake_encoder.texts_encoded == 0

    served = client.post("/embed", {"text": "hi"}, content_type="application/json", **auth)
    documented = schema["paths"]["/embed"]["post"]["responses"]["200"]["headers"]
    for name, spec in documented.items():
        if spec.get("required"):
            assert name in served, name
    assert {name.lower() for name in served.headers} >= RATE_LIMIT_HEADERS


def test_it_documents_metrics_even_though_it_is_no_drf_view(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/metrics"]["get"]

    assert "text/plain" in operation["responses"]["200"]["content"]
    assert "embed_requests_total" in operation["description"]
    assert "METRICS_TOKEN" in schema["components"]["securitySchemes"]["metricsToken"]["description"]


def local_assets(page: str) -> list[str]:
    return re.findall(r'(?:href|src)="([^"]+)"', page)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_it_serves_the_docs_pages_from_this_host_only(db: None, path: str) -> None:
    client = Client()
    response = client.get(path, HTTP_ACCEPT="text/html")

    assert response.status_code == 200
    page = response.content.decode()
    assert "/openapi.json" in page
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I), page[:2000]
    assets = local_assets(page)
    assert any(asset.endswith(".js") for asset in assets)
    for asset in assets:
        assert asset.startswith("/static/"), asset
        served = client.get(asset)
        assert served.status_code == 200, asset
        # Static files stream: getvalue() joins the chunks.
        assert served.getvalue()


def test_it_keeps_swagger_ui_from_calling_the_online_validator(db: None) -> None:
    page = Client().get("/docs").content.decode()

    assert '"validatorUrl": null' in page


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "operation_selector"),
    [("/docs", ".opblock"), ("/redoc", "[data-section-id^='operation/']")],
)
def test_it_renders_the_docs_in_a_browser_that_reaches_no_other_host(
    live_server: Any, output_dir: Path, path: str, operation_selector: str
) -> None:
    with chromium() as driver:
        driver.get(f"{live_server.url}{path}")
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, operation_selector)) >= len(OPERATIONS)
        )
        shown = driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(output_dir / f"docs{path.replace('/', '-')}.png"))
        urls = requested_urls(driver)

    assert "/v1/embeddings" in shown
    assert "/batch-embed" in shown
    assert f"{live_server.url}/openapi.json" in urls
    assert any("/static/drf_spectacular_sidecar/" in url for url in urls)
    outside = [url for url in urls if not url.startswith((live_server.url, "data:", "blob:"))]
    assert outside == []


def test_it_states_the_validations_limits_for_the_served_model(
    db: None, fake_encoder: Any, settings: Any
) -> None:
    settings.MAX_TEXTS_PER_REQUEST = 7
    settings.OPENAI_MAX_INPUTS_PER_REQUEST = 9
    components = json.loads(Client().get("/openapi.json").content)["components"]["schemas"]

    embed = components["EmbedInput"]["properties"]
    assert (embed["text"]["minLength"], embed["text"]["pattern"]) == (1, r"\S")
    assert (embed["dimensions"]["minimum"], embed["dimensions"]["maximum"]) == (1, 16)
    prompt_names = components[embed["prompt_name"]["allOf"][0]["$ref"].rsplit("/", 1)[1]]
    assert set(prompt_names["enum"]) == {"query", "document"}
    texts = components["BatchEmbedInput"]["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"]) == (1, 7)
    openai = components["OpenAIEmbeddingInput"]["properties"]
    one, several, token_ids, token_arrays = openai["input"]["oneOf"]
    assert one["pattern"] == several["items"]["pattern"] == r"\S"
    assert (several["maxItems"], token_arrays["maxItems"]) == (9, 9)  # OpenAI's ceiling
    truncate = components["EmbedInput"]["properties"]["truncate"]
    assert truncate["type"] == "boolean"
    tokenize = components["TokenizeInput"]["properties"]["inputs"]["oneOf"]
    assert tokenize[1]["maxItems"] == 7
    decode = components["DecodeInput"]["properties"]["ids"]["oneOf"]
    assert decode[0]["items"]["maximum"] == fake_encoder.vocab_size - 1
    assert token_ids["items"]["maximum"] == fake_encoder.vocab_size - 1
    model_names = components[openai["model"]["allOf"][0]["$ref"].rsplit("/", 1)[1]]
    assert "fake-model" in model_names["enum"]


@pytest.mark.parametrize("path", ["/embed", "/batch-embed", "/v1/embeddings", "/embeddings"])
def test_it_shows_request_examples_that_the_served_model_accepts(
    alice: Any, fake_encoder: Any, path: str
) -> None:
    client = Client()
    schema = json.loads(client.get("/openapi.json").content)
    content = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]

    for name, example in content["examples"].items():
        response = client.post(
            path, example["value"], content_type="application/json", **alice.client_headers
        )
        assert response.status_code == 200, (name, response.json())
