"""The browsable API on the embed endpoints: staff log in through the admin, open an endpoint in the
browser, get a form that starts from a working example, and POST it (CSRF enforced) to see the
embedding on the page. API clients keep getting JSON."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from accounts.models import Tenant, UsageLog
from tests.headless_chromium import chromium

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
# What the browsable API's own script (ajax-form.js) sends when its form is submitted.
FORM_ACCEPT = "text/html; q=1.0, */*"
PASSWORD = "correct horse battery staple"

ENDPOINTS = [
    ("/embed", {"text": "안녕하세요, 반갑습니다!"}),
    ("/batch-embed", {"texts": ["첫 번째", "두 번째", "세 번째"]}),
    ("/v1/embeddings", {"input": ["첫 번째", "두 번째", "세 번째"]}),
    ("/embeddings", {"input": ["첫 번째", "두 번째", "세 번째"]}),
]


@pytest.fixture
def operator(db: None) -> Any:
    return get_user_model().objects.create_user(
        username="operator", email="ops@example.com", password=PASSWORD, is_staff=True
    )


@pytest.fixture
def browser(operator: Any) -> Client:
    """A browser whose user logged in through the admin's login form, CSRF checks on."""
    client = Client(enforce_csrf_checks=True)
    page = client.get("/admin/login/", HTTP_ACCEPT=BROWSER_ACCEPT)
    assert page.status_code == 200
    response = client.post(
        "/admin/login/",
        {
            "username": "operator",
            "password": PASSWORD,
            "next": "/embed",
            "csrfmiddlewaretoken": client.cookies["csrftoken"].value,
        },
    )
    assert response.status_code == 302, response.content[:500]
    assert response["Location"] == "/embed"
    return client


def raw_form_body(page: str) -> Any:
    """The JSON in the page's raw-data form (what a person would edit and submit)."""
    match = re.search(r'<textarea name="_content"[^>]*>(.*?)</textarea>', page, re.S)
    assert match, "the page has no raw-data form"
    return json.loads(html.unescape(match.group(1)))


def csrf_header(page: str) -> dict[str, str]:
    """The header and token the page's script would send with the form."""
    match = re.search(r'<script type="application/json" id="drf_csrf">(.*?)</script>', page, re.S)
    assert match, "the page carries no CSRF token for its form"
    config = json.loads(match.group(1))
    assert config["csrfToken"]
    return {config["csrfHeaderName"]: config["csrfToken"]}


def shown_response(page: str) -> tuple[int, Any]:
    """The status and JSON body that the page shows as the endpoint's answer."""
    match = re.search(
        r'<div class="response-info".*?<b>HTTP (\d+) .*?\n\n</span>(.*?)</pre>', page, re.S
    )
    assert match, "the page shows no response"
    # The page turns URLs into links; the JSON is the text around them.
    text = re.sub(r"<[^>]+>", "", match.group(2))
    return int(match.group(1)), json.loads(html.unescape(text))


def submit_form(client: Client, path: str) -> tuple[Any, Any]:
    """Opens `path`, submits its form as it is, as the page's script does. (form body, reply)"""
    page = client.get(path, HTTP_ACCEPT=BROWSER_ACCEPT).content.decode()
    body = raw_form_body(page)
    reply = client.post(
        path,
        data=json.dumps(body, ensure_ascii=False),
        content_type="application/json",
        headers={"Accept": FORM_ACCEPT, **csrf_header(page)},
    )
    return body, reply


def test_it_shows_a_logged_in_staff_member_the_description_and_a_prefilled_form(
    browser: Client, operator: Any, fake_encoder: Any
) -> None:
    response = browser.get("/embed", HTTP_ACCEPT=BROWSER_ACCEPT)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "Embed one text" in page  # the endpoint's description
    assert 'id="login-link"' not in page
    assert "operator" in page
    assert raw_form_body(page) == {
        "prompt_name": None,
        "dimensions": None,
        "truncate": None,
        "truncation_direction": "right",
        "normalize": True,
        "text": "안녕하세요, 반갑습니다!",
    }
    status, shown = shown_response(page)
    assert status == 200
    assert shown["example"] == {"text": "안녕하세요, 반갑습니다!"}
    # Looking at the page is no API call: no model work, no usage row, nothing charged.
    assert fake_encoder.texts_encoded == 0
    assert not UsageLog.objects.filter(user=operator).exists()


def test_it_embeds_what_the_form_posts_and_shows_the_embedding_on_the_page(
    browser: Client, operator: Any, alice: Any, api: Any, fake_encoder: Any
) -> None:
    body, reply = submit_form(browser, "/embed")

    assert reply.status_code == 200
    assert reply["Content-Type"].startswith("text/html")
    status, shown = shown_response(reply.content.decode())
    assert status == 200
    assert shown["model"] == "fake-model"
    assert shown["dimensions"] == 16
    same_via_api = api.post("/embed", body, format="json", headers=alice.headers).json()
    assert shown["embedding"] == same_via_api["embedding"]
    # Charged to the staff member's own tenant, like any served request.
    served = UsageLog.objects.get(user=operator)
    assert served.status_code == 200
    assert served.tokens > 0
    assert served.tenant == Tenant.objects.get(personal_owner=operator)


@pytest.mark.parametrize(("path", "example"), ENDPOINTS)
def test_it_gives_every_embed_endpoint_a_working_form(
    browser: Client, fake_encoder: Any, path: str, example: dict[str, Any]
) -> None:
    body, reply = submit_form(browser, path)

    assert {key: body[key] for key in example} == example
    assert reply.status_code == 200, reply.content[:1000]
    status, shown = shown_response(reply.content.decode())
    assert status == 200
    assert "embedding" in json.dumps(shown)
    assert fake_encoder.texts_encoded == len(body.get("texts") or body.get("input") or [1])


def test_it_refuses_a_form_post_without_the_csrf_token(
    browser: Client, operator: Any, fake_encoder: Any
) -> None:
    response = browser.post(
        "/embed",
        data=json.dumps({"text": "안녕하세요"}),
        content_type="application/json",
        HTTP_ACCEPT="application/json",
    )

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["type"] == "permission_error"
    assert "CSRF" in error["message"]
    assert fake_encoder.texts_encoded == 0
    assert not UsageLog.objects.filter(user=operator, status_code=200).exists()


def test_it_asks_an_anonymous_browser_to_log_in(db: None, fake_encoder: Any) -> None:
    response = Client(enforce_csrf_checks=True).get("/embed", HTTP_ACCEPT=BROWSER_ACCEPT)

    assert response.status_code == 401
    page = response.content.decode()
    assert response["Content-Type"].startswith("text/html")
    assert 'href="/admin/login/?next=/embed"' in page
    assert 'name="_content"' not in page  # no form for someone who may not use it


def test_it_does_not_let_a_non_staff_session_use_the_api(db: None, fake_encoder: Any) -> None:
    user = get_user_model().objects.create_user(username="visitor", password=PASSWORD)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    page = client.get("/embed", HTTP_ACCEPT=BROWSER_ACCEPT)
    call = client.post("/embed", {"text": "hi"}, content_type="application/json")

    assert page.status_code == 401
    assert call.status_code in (401, 403)
    assert fake_encoder.texts_encoded == 0


def test_it_keeps_answering_api_clients_in_json(alice: Any, fake_encoder: Any) -> None:
    client = Client(enforce_csrf_checks=True)  # a bearer token needs no CSRF token

    served = client.post(
        "/embed", {"text": "안녕하세요"}, content_type="application/json", headers=alice.headers
    )
    wrong_method = client.get("/embed", headers=alice.headers)
    wrong_method_json = client.get("/embed", HTTP_ACCEPT="application/json", headers=alice.headers)
    anonymous = client.get("/embed", HTTP_ACCEPT="application/json")

    assert served.status_code == 200
    assert served["Content-Type"] == "application/json"
    assert len(served.json()["embedding"]) == 16
    for response in (wrong_method, wrong_method_json):
        assert response.status_code == 405
        assert response["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == "method_not_allowed"
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_credentials"


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json; q=1.0"])
def test_it_answers_a_post_in_json_to_clients_that_accept_anything_or_json(
    alice: Any, fake_encoder: Any, accept: str | None
) -> None:
    headers = {**alice.headers, **({"Accept": accept} if accept else {})}
    served = Client().post(
        "/embed", {"text": "hello"}, content_type="application/json", headers=headers
    )
    assert served.status_code == 200
    assert served["Content-Type"] == "application/json"
    assert len(served.json()["embedding"]) == 16


def test_it_still_renders_a_post_as_the_browsable_page_when_asked(
    alice: Any, fake_encoder: Any
) -> None:
    for path, accept in (("/embed", BROWSER_ACCEPT), ("/embed?format=api", "*/*")):
        page = Client().post(
            path,
            {"text": "hello"},
            content_type="application/json",
            headers={**alice.headers, "Accept": accept},
        )
        assert page.status_code == 200
        assert page["Content-Type"].startswith("text/html")


def test_it_serves_the_browsable_pages_static_files_with_debug_off(
    browser: Client, fake_encoder: Any, settings: Any
) -> None:
    assert settings.DEBUG is False
    page = browser.get("/embed", HTTP_ACCEPT=BROWSER_ACCEPT).content.decode()
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page)

    assert any(asset.endswith(".css") for asset in assets)
    assert any(asset.endswith(".js") for asset in assets)
    for asset in assets:
        response = browser.get(asset)
        assert response.status_code == 200, asset
        # Static files stream: getvalue() joins the chunks.
        assert response.getvalue()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_it_lets_staff_embed_korean_text_from_a_real_browser(
    live_server: Any, fake_encoder: Any, output_dir: Any
) -> None:
    get_user_model().objects.create_user(username="operator", password=PASSWORD, is_staff=True)

    with chromium() as driver:
        driver.get(f"{live_server.url}/embed")
        assert "401" in driver.find_element(By.CSS_SELECTOR, ".response-info").text
        driver.find_element(By.ID, "login-link").click()
        driver.find_element(By.NAME, "username").send_keys("operator")
        driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.NAME, "_content"))
        assert driver.current_url == f"{live_server.url}/embed"
        form = json.loads(driver.find_element(By.NAME, "_content").get_attribute("value"))
        assert form["text"] == "안녕하세요, 반갑습니다!"
        driver.save_screenshot(str(output_dir / "browsable-embed-form.png"))

        driver.find_element(By.CSS_SELECTOR, "#post-generic-content-form button").click()
        # The form posts and the page is replaced: an element read while that happens goes
        # stale, so the wait ignores that and looks again until the answer is there.
        WebDriverWait(driver, 20, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: '"embedding": [' in d.find_element(By.CSS_SELECTOR, ".response-info").text
        )
        answer = driver.find_element(By.CSS_SELECTOR, ".response-info").text
        driver.save_screenshot(str(output_dir / "browsable-embed-answer.png"))

    assert "HTTP 200 OK" in answer
    assert '"embedding": [' in answer
    assert '"model": "fake-model"' in answer
    assert fake_encoder.texts_encoded == 1
