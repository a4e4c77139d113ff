"""CORS (django-cors-headers): off by default; from the origins in CORS_ALLOWED_ORIGINS (or
matching CORS_ALLOWED_ORIGIN_REGEXES) a browser may call the API. Preflights are answered before
authentication, since browsers send them without credentials."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from django.test import Client

from accounts.models import Plan
from tests.conftest import FakeEncoder, Person
from tests.service import Service, start_service

APP = "https://app.example.com"
OTHER = "https://evil.example.net"
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
}


@pytest.fixture
def cors(settings: Any) -> Any:
    settings.CORS_ALLOWED_ORIGINS = [APP]
    settings.CORS_ALLOWED_ORIGIN_REGEXES = [r"^https://[a-z0-9-]+\.preview\.example\.com$"]
    return settings


def preflight(origin: str, path: str = "/v1/embeddings", **headers: str) -> Any:
    return Client().options(
        path,
        HTTP_ORIGIN=origin,
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS=headers.get(
            "request_headers", "authorization,content-type,x-tenant,x-stainless-os"
        ),
    )


def listed(value: str | None) -> set[str]:
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


@pytest.mark.parametrize(
    "origin", [APP, "https://pr-12.preview.example.com"], ids=["listed", "regex"]
)
@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed", "/batch-embed", "/v1/models"])
def test_it_answers_a_preflight_from_an_allowed_origin_before_authentication(
    cors: Any, db: None, origin: str, path: str
) -> None:
    response = preflight(origin, path)

    assert response.status_code == 200  # not 401: a preflight carries no credential
    assert response["Access-Control-Allow-Origin"] == origin
    assert "post" in listed(response["Access-Control-Allow-Methods"])
    assert {"authorization", "content-type", "x-tenant", "x-stainless-os"} <= listed(
        response["Access-Control-Allow-Headers"]
    )
    assert int(response["Access-Control-Max-Age"]) == 600
    assert "Access-Control-Allow-Credentials" not in response  # bearer tokens, never cookies


@pytest.mark.parametrize("origin", [OTHER, "https://preview.example.com", "http://app.example.com"])
def test_it_gives_no_cors_headers_to_other_origins(cors: Any, db: None, origin: str) -> None:
    response = preflight(origin)

    assert "Access-Control-Allow-Origin" not in response
    assert "Access-Control-Allow-Methods" not in response


def test_it_is_off_by_default(db: None, fake_encoder: FakeEncoder, alice: Person) -> None:
    response = preflight(APP)
    answered = Client().post(
        "/v1/embeddings",
        {"input": "x"},
        content_type="application/json",
        HTTP_ORIGIN=APP,
        **alice.client_headers,
    )

    assert "Access-Control-Allow-Origin" not in response
    assert answered.status_code == 200
    assert "Access-Control-Allow-Origin" not in answered


def test_it_lets_the_browser_read_answers_and_their_rate_limit_headers(
    cors: Any, db: None, fake_encoder: FakeEncoder, alice: Person
) -> None:
    response = Client().post(
        "/v1/embeddings",
        {"input": "x"},
        content_type="application/json",
        HTTP_ORIGIN=APP,
        **alice.client_headers,
    )

    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == APP
    exposed = listed(response["Access-Control-Expose-Headers"])
    assert RATE_LIMIT_HEADERS | {"x-request-id", "retry-after"} <= exposed
    assert {name.lower() for name in response.headers} >= RATE_LIMIT_HEADERS
    assert "Vary" in response
    assert "origin" in listed(response["Vary"])


def test_it_lets_the_browser_read_errors_too(
    cors: Any, db: None, fake_encoder: FakeEncoder
) -> None:
    unauthenticated = Client().post(
        "/v1/embeddings", {"input": "x"}, content_type="application/json", HTTP_ORIGIN=APP
    )

    assert unauthenticated.status_code == 401
    assert unauthenticated["Access-Control-Allow-Origin"] == APP
    assert unauthenticated.json()["error"]["type"] == "authentication_error"


def test_it_lets_the_browser_read_retry_after_on_a_429(
    cors: Any, db: None, fake_encoder: FakeEncoder, alice: Person
) -> None:
    alice.tenant.plan = Plan.objects.create(name="one token", tokens_per_minute=1)
    alice.tenant.save(update_fields=["plan"])

    response = Client().post(
        "/v1/embeddings",
        {"input": "several words here"},
        content_type="application/json",
        HTTP_ORIGIN=APP,
        **alice.client_headers,
    )

    assert response.status_code == 429
    assert response["Access-Control-Allow-Origin"] == APP
    assert "Retry-After" in response
    assert "retry-after" in listed(response["Access-Control-Expose-Headers"])


# --- Configured from the environment, through a real gunicorn ----------------------------------


@pytest.fixture(scope="module")
def cors_service(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start_service(
        tmp_path_factory.mktemp("cors"),
        env={
            "CORS_ALLOWED_ORIGINS": f"{APP},http://localhost:5173",
            "CORS_ALLOWED_ORIGIN_REGEXES": r"^https://[a-z0-9-]+\.preview\.example\.com$",
        },
    )
    yield service
    service.stop()


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_takes_its_origins_from_the_environment(cors_service: Service, alice: Person) -> None:
    def options(origin: str) -> requests.Response:
        return requests.options(
            cors_service.url + "/v1/embeddings",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
            timeout=30,
        )

    for origin in (APP, "http://localhost:5173", "https://pr-7.preview.example.com"):
        response = options(origin)
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Origin" not in options(OTHER).headers
    served = cors_service.post(
        "/v1/embeddings", json={"input": "x"}, headers={**alice.headers, "Origin": APP}
    )
    assert served.status_code == 200
    assert served.headers["Access-Control-Allow-Origin"] == APP
    assert "x-ratelimit-remaining-requests" in listed(
        served.headers["Access-Control-Expose-Headers"]
    )
