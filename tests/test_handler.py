"""The WSGI application gunicorn serves: a call with a bearer credential skips the middleware
only browsers need (sessions, CSRF, Django's user, messages, axes, static files); everything
else, and every other request, goes through the whole list."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from axes.middleware import AxesMiddleware
from django.conf import settings
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.middleware.csrf import CsrfViewMiddleware
from django.test import Client

from embedplatform.handler import api_middleware
from embedplatform.wsgi import application
from tests.conftest import FakeEncoder, Person


@pytest.fixture(autouse=True)
def _connection_kept() -> Iterator[None]:
    # As Django's test client does: the test's transaction must outlive each request.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def browser_middleware_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the browser-only middleware that saw a request, in order."""
    seen: list[str] = []

    def recording(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def record(self: Any, *args: Any) -> Any:
            seen.append(name)
            return method(self, *args)

        return record

    monkeypatch.setattr(
        SessionMiddleware,
        "process_request",
        recording("session", SessionMiddleware.process_request),
    )
    monkeypatch.setattr(
        CsrfViewMiddleware, "process_request", recording("csrf", CsrfViewMiddleware.process_request)
    )
    monkeypatch.setattr(AxesMiddleware, "__call__", recording("axes", AxesMiddleware.__call__))
    return seen


def call(
    method: str, path: str, *, body: dict[str, Any] | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    raw = json.dumps(body).encode() if body is not None else b""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(raw)),
        "wsgi.input": io.BytesIO(raw),
        **{f"HTTP_{name.upper()}": value for name, value in headers.items()},
    }
    setup_testing_defaults(environ)
    answer: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], *_: Any) -> None:
        answer["status"] = int(status.split()[0])
        answer["headers"] = {name.lower(): value for name, value in response_headers}

    chunks = application(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    return answer["status"], answer["headers"], content


def test_it_serves_a_bearer_call_without_the_browser_middleware(
    alice: Person, fake_encoder: FakeEncoder, browser_middleware_calls: list[str]
) -> None:
    status, headers, content = call(
        "POST",
        "/v1/embeddings",
        body={"input": "hello", "model": fake_encoder.name},
        authorization=f"Bearer {alice.token}",
        x_request_id="handler-test-1",
    )
    assert status == 200, content
    assert len(json.loads(content)["data"]) == 1
    assert browser_middleware_calls == []
    # What the other middleware add is all there: the length (CommonMiddleware), the security
    # headers, the request id, the rate-limit headers; and no session cookie.
    assert headers["content-length"] == str(len(content))
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-request-id"] == "handler-test-1"
    assert "x-ratelimit-remaining-requests" in headers
    assert "set-cookie" not in headers


def test_it_refuses_a_bad_bearer_credential_the_same_way(
    db: None, browser_middleware_calls: list[str]
) -> None:
    status, headers, content = call(
        "POST", "/v1/embeddings", body={"input": "hello"}, authorization="Bearer not-a-token"
    )
    assert status == 401
    assert json.loads(content)["error"]["code"]
    assert headers["www-authenticate"].startswith("Bearer")
    assert browser_middleware_calls == []


def test_it_sends_a_call_without_a_bearer_credential_through_every_middleware(
    db: None, browser_middleware_calls: list[str]
) -> None:
    status, _, _ = call("POST", "/v1/embeddings", body={"input": "hello"})
    assert status == 401
    assert set(browser_middleware_calls) == {"session", "csrf", "axes"}


def test_it_sends_the_admin_through_every_middleware_even_with_a_bearer_header(
    alice: Person, browser_middleware_calls: list[str]
) -> None:
    status, headers, _ = call("GET", "/admin/login/", authorization=f"Bearer {alice.token}")
    assert status == 200
    assert "csrftoken=" in headers.get("set-cookie", "")
    assert set(browser_middleware_calls) == {"session", "csrf", "axes"}


def test_it_serves_static_files_to_a_request_with_a_bearer_header(alice: Person) -> None:
    status, headers, _ = call(
        "GET", "/static/rest_framework/js/load-ajax-form.js", authorization=f"Bearer {alice.token}"
    )
    assert status == 200
    assert "javascript" in headers["content-type"]


def test_it_still_checks_the_host_of_a_bearer_call(alice: Person) -> None:
    status, _, content = call(
        "POST",
        "/v1/embeddings",
        body={"input": "hello"},
        authorization=f"Bearer {alice.token}",
        host="attacker.example",
    )
    assert status == 400
    assert json.loads(content)["error"]["code"] == "bad_request"


def test_it_skips_only_browser_middleware_named_in_the_full_list_and_keeps_its_order() -> None:
    assert set(settings.BROWSER_MIDDLEWARE) <= set(settings.MIDDLEWARE)
    assert api_middleware() == [
        path for path in settings.MIDDLEWARE if path not in settings.BROWSER_MIDDLEWARE
    ]
    assert "django.middleware.common.CommonMiddleware" in api_middleware()
    assert "django.middleware.security.SecurityMiddleware" in api_middleware()


def test_it_renders_the_browsable_api_for_a_bearer_call(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    status, headers, content = call(
        "GET", "/v1/embeddings", authorization=f"Bearer {alice.token}", accept="text/html"
    )
    assert status == 200, content[:500]
    assert headers["content-type"].startswith("text/html")
    page = content.decode()
    assert "Embeddings" in page or "embeddings" in page
    assert 'method="POST"' in page  # the form to try the endpoint


def test_it_gives_the_test_client_the_chains_gunicorn_serves(
    alice: Person, fake_encoder: FakeEncoder, browser_middleware_calls: list[str]
) -> None:
    response = Client().post(
        "/v1/embeddings",
        {"input": "hello", "model": fake_encoder.name},
        content_type="application/json",
        **alice.client_headers,
    )
    assert response.status_code == 200
    assert browser_middleware_calls == []
    Client().get("/admin/login/")
    assert set(browser_middleware_calls) == {"session", "csrf", "axes"}
