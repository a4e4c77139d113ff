"""The usage dashboard as an operator sees it: headless Chromium (Debian's chromium and
chromium-driver) driven by selenium against a live server, with screenshots in test-output/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count, Q, Sum

from accounts import services
from accounts.dashboard_selectors import window_start
from accounts.models import ApiKey, QuotaPeriod, Tenant, UsageLog
from accounts.selectors import current_period_start, effective_limits
from tests.usage_seed import seed_usage

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
)
PASSWORD = "a long operator passphrase"

pytestmark = pytest.mark.browser


@pytest.fixture
def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Any]]:
    """Starts Chromium under chromedriver when the test asks, so that a machine without them
    fails the test itself, loudly, rather than skipping it: the admin is tested in a browser."""
    drivers: list[Any] = []

    def start() -> Any:
        missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
        if missing:
            pytest.fail(
                "Headless Chromium is needed for the admin browser tests, and "
                f"{', '.join(missing)} is missing. Install Debian's packages: "
                "apt-get install -y chromium chromium-driver",
                pytrace=False,
            )
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.options import Options
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            pytest.fail(
                "selenium is needed for the admin browser tests: "
                "pip install -r requirements-dev.txt",
                pytrace=False,
            )
        # Both paths are given, so selenium-manager has nothing to look up; offline all the same.
        monkeypatch.setenv("SE_OFFLINE", "true")
        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'chromium-profile-{len(drivers)}'}")
        driver = webdriver.Chrome(
            service=Service(executable_path=str(CHROMEDRIVER)), options=options
        )
        drivers.append(driver)
        driver.set_page_load_timeout(60)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


def screenshot(browser: Any, path: Path, *, whole_page: bool = True) -> None:
    height = browser.execute_script(
        "window.scrollTo(0, 0); return document.documentElement.scrollHeight"
    )
    browser.set_window_size(1440, max(1000, int(height)) if whole_page else 1000)
    browser.save_screenshot(str(path))
    browser.set_window_size(1440, 1000)
    assert path.stat().st_size > 20_000  # a rendered page, not a blank one


def number(text: str) -> int:
    return int(text.replace(",", ""))


def metric(element: Any, name: str) -> str:
    from selenium.webdriver.common.by import By

    return str(element.find_element(By.CSS_SELECTOR, f'[data-metric="{name}"]').text)


@pytest.mark.django_db(transaction=True)
def test_it_shows_an_operator_the_usage_dashboard_and_a_tenants_usage(
    chromium: Callable[[], Any], live_server: Any, output_dir: Path, django_user_model: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    browser = chromium()
    seed_usage(tenants=8, rows=4_000, days=30)
    django_user_model.objects.create_superuser("operator", "operator@example.com", PASSWORD)
    since = window_start()
    month_start = datetime.combine(current_period_start(), datetime.min.time(), tzinfo=UTC)

    # Logging in through the admin's own form, on the way to the dashboard.
    browser.get(f"{live_server.url}/admin/usage/")
    assert "/admin/login/" in browser.current_url
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(browser, 30).until(
        expected_conditions.url_to_be(f"{live_server.url}/admin/usage/")
    )

    # Totals of the last 30 days.
    window = UsageLog.objects.filter(created_at__gte=since).aggregate(
        requests=Count("id"),
        tokens=Sum("tokens"),
        errors=Count("id", filter=Q(status_code__gte=400)),
    )
    totals = browser.find_element(By.ID, "usage-totals")
    assert number(metric(totals, "requests")) == window["requests"] == 4_000
    assert number(metric(totals, "tokens")) == window["tokens"]
    assert number(metric(totals, "errors")) == window["errors"]
    assert metric(totals, "p95").endswith(" ms")

    # The three charts are drawn, with a bar for the busiest day.
    charts = browser.find_elements(By.CSS_SELECTOR, "figure.usage-chart svg")
    assert len(charts) == 3
    assert all(chart.is_displayed() and chart.size["height"] > 100 for chart in charts)
    assert browser.find_elements(By.CSS_SELECTOR, "figure.usage-chart rect.tone-primary")

    # Top tenants this month, in the order of the database.
    expected_top = list(
        UsageLog.objects.filter(created_at__gte=month_start)
        .values("tenant_id")
        .annotate(tokens=Sum("tokens"), requests=Count("id"))
        .order_by("-tokens", "-requests", "tenant_id")[:10]
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#top-tenants tbody tr")
    shown = [
        (
            int(row.get_attribute("data-tenant-id")),
            number(metric(row, "tokens")),
            number(metric(row, "requests")),
        )
        for row in rows
    ]
    assert shown == [(row["tenant_id"], row["tokens"], row["requests"]) for row in expected_top]
    assert len(shown) == 8

    # Quota use: what QuotaPeriod charged against each tenant's effective quota.
    for row in browser.find_elements(By.CSS_SELECTOR, "#quota-use tbody tr"):
        tenant = Tenant.objects.select_related("plan").get(pk=row.get_attribute("data-tenant-id"))
        period = QuotaPeriod.objects.get(tenant=tenant, period_start=current_period_start())
        quota = effective_limits(tenant).monthly_token_quota
        assert number(metric(row, "quota-tokens")) == period.tokens
        assert number(metric(row, "quota-limit")) == quota
        assert metric(row, "quota-percent") == f"{period.tokens / quota * 100:.1f}%"

    assert browser.find_element(By.ID, "prometheus-link").get_attribute("href").startswith("http")
    screenshot(browser, output_dir / "admin-usage-dashboard.png")

    # The busiest tenant's own page, reached from the ranking.
    top = Tenant.objects.get(pk=expected_top[0]["tenant_id"])
    rows[0].find_element(By.TAG_NAME, "a").click()
    WebDriverWait(browser, 30).until(
        expected_conditions.url_to_be(f"{live_server.url}/admin/usage/tenant/{top.pk}/")
    )
    assert top.name in browser.find_element(By.TAG_NAME, "h1").text
    own = UsageLog.objects.filter(tenant=top, created_at__gte=since).aggregate(
        requests=Count("id"),
        tokens=Sum("tokens"),
        errors=Count("id", filter=Q(status_code__gte=400)),
    )
    totals = browser.find_element(By.ID, "usage-totals")
    assert number(metric(totals, "requests")) == own["requests"]
    assert number(metric(totals, "tokens")) == own["tokens"]
    assert number(metric(totals, "errors")) == own["errors"]
    period = QuotaPeriod.objects.get(tenant=top, period_start=current_period_start())
    quota = browser.find_element(By.ID, "tenant-quota")
    assert number(metric(quota, "quota-tokens")) == period.tokens
    assert number(metric(quota, "quota-limit")) == effective_limits(top).monthly_token_quota
    assert number(metric(quota, "quota-remaining")) == max(
        0, effective_limits(top).monthly_token_quota - period.tokens
    )
    # Today's line of the daily figures.
    browser.find_element(By.CSS_SELECTOR, "#usage-daily summary").click()
    today = datetime.now(UTC).date()
    today_row = browser.find_element(By.CSS_SELECTOR, f'#usage-daily tr[data-day="{today}"]')
    today_start = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    assert (
        number(metric(today_row, "requests"))
        == UsageLog.objects.filter(tenant=top, created_at__gte=today_start).count()
    )
    screenshot(browser, output_dir / "admin-usage-tenant.png")

    # From there, the tenant's rows of the usage log.
    browser.find_element(By.LINK_TEXT, "Usage log").click()
    WebDriverWait(browser, 30).until(expected_conditions.url_contains("/admin/accounts/usagelog/"))
    paginator = browser.find_element(By.CSS_SELECTOR, "#changelist .paginator").text
    assert f"{UsageLog.objects.filter(tenant=top).count()} usage logs" in paginator
    listed = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(listed) == 100
    assert all(top.name in row.text for row in listed)
    screenshot(browser, output_dir / "admin-usage-log.png", whole_page=False)

    # The admin home leads to the dashboard.
    browser.get(f"{live_server.url}/admin/")
    screenshot(browser, output_dir / "admin-index.png", whole_page=False)
    browser.find_element(By.CSS_SELECTOR, "#usage-module a").click()
    WebDriverWait(browser, 30).until(
        expected_conditions.url_to_be(f"{live_server.url}/admin/usage/")
    )

    # A new API key: its secret on the page that answers the form, and nowhere after.
    browser.get(f"{live_server.url}/admin/accounts/apikey/add/?tenant={top.pk}")
    browser.find_element(By.NAME, "name").send_keys("browser key")
    browser.find_element(By.NAME, "_save").click()
    WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_element_located((By.ID, "new-api-key"))
    )
    secret = browser.find_element(By.ID, "new-api-key").get_attribute("value")
    api_key = ApiKey.objects.get(name="browser key")
    assert api_key.tenant == top
    assert services.hash_api_key(secret) == api_key.hashed_key
    screenshot(browser, output_dir / "admin-api-key-created.png", whole_page=False)
    browser.find_element(By.LINK_TEXT, "Done: view the key").click()
    WebDriverWait(browser, 30).until(expected_conditions.url_contains("/change/"))
    assert api_key.prefix in browser.page_source
    assert secret not in browser.page_source
