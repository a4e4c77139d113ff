"""The operators' admin: tenants, members, plans, API keys, quota periods and the usage log."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts import services
from accounts.admin.usage import UsageLogAdmin, UsageLogPaginator
from accounts.models import ApiKey, Membership, Plan, QuotaPeriod, UsageLog
from accounts.selectors import current_period_start
from tests.conftest import usage_row
from tests.helpers import embed

pytestmark = pytest.mark.django_db


def changelist_ids(response: Any) -> list[int]:
    return [row.pk for row in response.context["cl"].result_list]


def test_it_opens_every_admin_page_for_an_operator(
    operator_client: Client, alice: Any, bob: Any
) -> None:
    api_key, _ = services.create_api_key(tenant=alice.tenant, name="ci")
    usage = usage_row(alice.tenant, api_key=api_key)
    QuotaPeriod.objects.create(tenant=alice.tenant, period_start=current_period_start(), tokens=5)
    membership = Membership.objects.get(user=bob.user)
    pages = {
        "accounts/tenant": alice.tenant.pk,
        "accounts/membership": membership.pk,
        "accounts/plan": alice.tenant.plan_id,
        "accounts/apikey": api_key.pk,
        "accounts/usagelog": usage.pk,
        "accounts/quotaperiod": QuotaPeriod.objects.get().pk,
        "accounts/supabaseidentity": bob.user.supabase_identity.pk,
    }
    for model, pk in pages.items():
        assert operator_client.get(f"/admin/{model}/").status_code == 200, model
        assert operator_client.get(f"/admin/{model}/{pk}/change/").status_code == 200, model
    for model in ("accounts/tenant", "accounts/membership", "accounts/plan", "accounts/apikey"):
        assert operator_client.get(f"/admin/{model}/add/").status_code == 200, model


# --- Tenants, members, plans -------------------------------------------------------------------


def test_it_lists_tenants_with_plan_quota_use_and_a_usage_link(
    operator_client: Client, alice: Any, settings: Any
) -> None:
    settings.MONTHLY_TOKEN_QUOTA = 3_000
    QuotaPeriod.objects.create(
        tenant=alice.tenant, period_start=current_period_start(), tokens=1_234
    )

    response = operator_client.get("/admin/accounts/tenant/")

    html = response.content.decode()
    assert "Alice&#x27;s team" in html
    assert "1234" in html.replace(",", "")
    assert "3000" in html.replace(",", "")
    assert f'href="/admin/usage/tenant/{alice.tenant.pk}/"' in html


def test_it_edits_a_tenant_with_its_members_keys_plan_overrides_and_active_flag(
    operator_client: Client, alice: Any, bob: Any
) -> None:
    api_key, secret = services.create_api_key(tenant=alice.tenant, name="deploy bot")
    premium = Plan.objects.create(name="premium", monthly_token_quota=50_000_000)
    url = f"/admin/accounts/tenant/{alice.tenant.pk}/change/"

    page = operator_client.get(url)

    html = page.content.decode()
    assert bob.email in html or bob.user.username in html  # the members inline
    assert "deploy bot" in html
    assert api_key.prefix in html
    assert secret not in html
    assert api_key.hashed_key not in html
    assert f"/admin/accounts/apikey/add/?tenant={alice.tenant.pk}" in html

    form = page.context["adminform"].form
    memberships = Membership.objects.filter(tenant=alice.tenant).order_by("pk")
    data = {
        "name": "Alice's company",
        "plan": premium.pk,
        "personal_owner": form.initial.get("personal_owner") or "",
        "requests_per_minute": "",
        "tokens_per_minute": "",
        "monthly_token_quota": "123456",
        "max_texts_per_request": "",
        "memberships-TOTAL_FORMS": str(len(memberships)),
        "memberships-INITIAL_FORMS": str(len(memberships)),
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        "api_keys-TOTAL_FORMS": "1",
        "api_keys-INITIAL_FORMS": "1",
        "api_keys-MIN_NUM_FORMS": "0",
        "api_keys-MAX_NUM_FORMS": "1000",
        "api_keys-0-id": str(api_key.pk),
        "api_keys-0-tenant": str(alice.tenant.pk),
    }
    for index, membership in enumerate(memberships):
        prefix = f"memberships-{index}"
        data |= {
            f"{prefix}-id": str(membership.pk),
            f"{prefix}-tenant": str(alice.tenant.pk),
            f"{prefix}-user": str(membership.user_id),
            f"{prefix}-role": "owner" if membership.user_id == bob.user.pk else membership.role,
            f"{prefix}-is_default": "on" if membership.is_default else "",
        }
    # Unchecked checkbox: is_active left out deactivates the tenant.
    response = operator_client.post(url, data)

    assert response.status_code == 302, response.context["adminform"].form.errors
    alice.tenant.refresh_from_db()
    assert alice.tenant.name == "Alice's company"
    assert alice.tenant.plan == premium
    assert alice.tenant.monthly_token_quota == 123_456
    assert alice.tenant.is_active is False
    assert Membership.objects.get(user=bob.user, tenant=alice.tenant).role == "owner"
    api_key.refresh_from_db()
    assert api_key.revoked_at is None
    assert api_key.name == "deploy bot"


def test_it_deactivates_tenants_with_an_action_and_their_requests_are_refused(
    operator_client: Client, alice: Any, api: Any, fake_encoder: Any
) -> None:
    assert (
        api.post("/embed", {"text": "hi"}, format="json", **alice.client_headers).status_code == 200
    )

    response = operator_client.post(
        "/admin/accounts/tenant/",
        {"action": "deactivate", "_selected_action": [str(alice.tenant.pk)]},
        follow=True,
    )

    assert b"1 tenant(s) deactivated." in response.content
    alice.tenant.refresh_from_db()
    assert alice.tenant.is_active is False
    refused = api.post("/embed", {"text": "hi"}, format="json", **alice.client_headers)
    assert refused.status_code == 403


def test_it_lists_plans_with_their_tenant_count(
    operator_client: Client, alice: Any, charlie: Any
) -> None:
    Plan.objects.create(name="empty plan", tokens_per_minute=10)

    cl = operator_client.get("/admin/accounts/plan/").context["cl"]

    counts = {plan.name: plan.tenant_total for plan in cl.result_list}
    assert counts == {alice.tenant.plan.name: 2, "empty plan": 0}


def test_it_searches_members_by_email(
    operator_client: Client, alice: Any, bob: Any, charlie: Any
) -> None:
    response = operator_client.get("/admin/accounts/membership/", {"q": "bob@example.com"})

    assert [(m.user_id, m.tenant_id) for m in response.context["cl"].result_list] == [
        (bob.user.pk, alice.tenant.pk)
    ]


# --- API keys ----------------------------------------------------------------------------------


def test_it_shows_a_new_api_keys_secret_once_then_only_its_prefix(
    operator_client: Client, operator: Any, alice: Any, api: Any, fake_encoder: Any
) -> None:
    form = operator_client.get(f"/admin/accounts/apikey/add/?tenant={alice.tenant.pk}")
    assert form.context["adminform"].form.initial["tenant"] == str(alice.tenant.pk)
    assert "hashed_key" not in form.content.decode()

    response = operator_client.post(
        "/admin/accounts/apikey/add/", {"tenant": alice.tenant.pk, "name": "ci runner"}
    )

    assert response.status_code == 200
    api_key = ApiKey.objects.get(name="ci runner")
    secret = response.context["secret"]
    assert secret.startswith(api_key.prefix + "_")
    assert secret in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    assert api_key.created_by == operator
    assert api_key.tenant == alice.tenant
    assert services.hash_api_key(secret) == api_key.hashed_key
    # The key works: it is the one the service stores.
    served = api.post(
        "/embed", {"text": "hello"}, format="json", HTTP_AUTHORIZATION=f"Bearer {secret}"
    )
    assert served.status_code == 200

    # Never again: not on the key's pages, not in the session, not in a cookie.
    for url in (
        "/admin/accounts/apikey/",
        f"/admin/accounts/apikey/{api_key.pk}/change/",
        f"/admin/accounts/tenant/{alice.tenant.pk}/change/",
    ):
        html = operator_client.get(url).content.decode()
        assert api_key.prefix in html
        assert secret not in html
        assert api_key.hashed_key not in html
    assert all(secret not in str(session.get_decoded()) for session in Session.objects.all())
    assert all(secret not in morsel.value for morsel in operator_client.cookies.values())
    assert ApiKey.objects.count() == 1


def test_it_revokes_api_keys_with_an_admin_action(
    operator_client: Client, alice: Any, charlie: Any, api: Any, fake_encoder: Any
) -> None:
    revoked, revoked_secret = services.create_api_key(tenant=alice.tenant, name="leaked")
    kept, kept_secret = services.create_api_key(tenant=charlie.tenant, name="kept")

    response = operator_client.post(
        "/admin/accounts/apikey/",
        {"action": "revoke", "_selected_action": [str(revoked.pk)]},
        follow=True,
    )

    assert b"1 API key(s) revoked." in response.content
    revoked.refresh_from_db()
    kept.refresh_from_db()
    assert revoked.revoked_at is not None
    assert kept.revoked_at is None
    refused = api.post(
        "/embed", {"text": "x"}, format="json", HTTP_AUTHORIZATION=f"Bearer {revoked_secret}"
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "revoked_api_key"
    served = api.post(
        "/embed", {"text": "x"}, format="json", HTTP_AUTHORIZATION=f"Bearer {kept_secret}"
    )
    assert served.status_code == 200
    listed = operator_client.get("/admin/accounts/apikey/", {"state": "revoked"})
    assert changelist_ids(listed) == [revoked.pk]


def test_it_builds_message_storage_only_for_requests_that_use_it(
    operator_client: Client, alice: Any, fake_encoder: Any
) -> None:
    served = embed(alice)
    assert served.status_code == 200
    # A bearer call skips the messages middleware altogether (embedplatform/handler.py).
    assert not hasattr(served.wsgi_request, "_messages")
    assert "messages" not in served.cookies
    probe = Client().get("/health")  # the whole chain, nothing that lists messages
    probe_request: Any = probe.wsgi_request  # with the flag LazyMessageMiddleware sets
    assert probe_request.message_storage_built is False

    page = operator_client.get("/admin/accounts/apikey/")
    # The admin's pages list messages, so they build it.
    admin_request: Any = page.wsgi_request
    assert admin_request.message_storage_built is True


def test_it_never_moves_a_key_to_another_tenant_or_unrevokes_it(
    operator_client: Client, alice: Any, charlie: Any
) -> None:
    api_key, _ = services.create_api_key(tenant=alice.tenant, name="old name")
    services.revoke_api_key(api_key=api_key)
    revoked_at = ApiKey.objects.get().revoked_at

    operator_client.post(
        f"/admin/accounts/apikey/{api_key.pk}/change/",
        {"tenant": charlie.tenant.pk, "name": "new name", "revoked_at": "", "expires_at": ""},
    )

    api_key.refresh_from_db()
    assert api_key.name == "new name"
    assert api_key.tenant == alice.tenant
    assert api_key.revoked_at == revoked_at


# --- Usage log ---------------------------------------------------------------------------------


def test_it_keeps_the_usage_log_read_only_even_for_superusers(
    operator_client: Client, alice: Any
) -> None:
    row = usage_row(alice.tenant, tokens=10)
    change_url = f"/admin/accounts/usagelog/{row.pk}/change/"

    assert operator_client.get("/admin/accounts/usagelog/add/").status_code == 403
    assert operator_client.get(f"/admin/accounts/usagelog/{row.pk}/delete/").status_code == 403
    page = operator_client.get(change_url)
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    operator_client.post(change_url, {"tokens": "0", "status_code": "500"})
    operator_client.post(
        "/admin/accounts/usagelog/",
        {"action": "delete_selected", "_selected_action": [str(row.pk)], "post": "yes"},
    )
    row.refresh_from_db()
    assert (row.tokens, row.status_code) == (10, 200)
    assert "delete_selected" not in operator_client.get("/admin/accounts/usagelog/").context[
        "cl"
    ].model_admin.get_actions(page.wsgi_request)
    assert operator_client.get("/admin/accounts/quotaperiod/add/").status_code == 403


def test_it_filters_the_usage_log_by_tenant_endpoint_status_and_date(
    operator_client: Client, alice: Any, charlie: Any
) -> None:
    now = timezone.now()
    served = usage_row(alice.tenant, endpoint="embed", created_at=now)
    refused = usage_row(
        alice.tenant, endpoint="openai_embeddings", status_code=429, tokens=0, created_at=now
    )
    failed = usage_row(
        charlie.tenant, endpoint="batch_embed", status_code=503, tokens=0, created_at=now
    )
    old = usage_row(charlie.tenant, endpoint="embed", created_at=now - timedelta(days=400))
    url = "/admin/accounts/usagelog/"

    def ids(**params: str) -> set[int]:
        return set(changelist_ids(operator_client.get(url, params)))

    assert ids(tenant__id__exact=str(alice.tenant.pk)) == {served.pk, refused.pk}
    assert ids(endpoint="embed") == {served.pk, old.pk}
    assert ids(endpoint="openai_embeddings") == {refused.pk}
    assert ids(status="served") == {served.pk, old.pk}
    assert ids(status="client_error") == {refused.pk}
    assert ids(status="rate_limited") == {refused.pk}
    assert ids(status="server_error") == {failed.pk}
    # What the date filter's "Past 7 days" link sends.
    past_week = {"created_at__gte": f"{(now - timedelta(days=7)).date()} 00:00:00+00:00"}
    assert ids(**past_week) == {served.pk, refused.pk, failed.pk}
    assert ids(created_at__year=str(old.created_at.year)) >= {old.pk}
    choices = operator_client.get(url).content.decode()
    for endpoint in ("embed", "batch_embed", "openai_embeddings"):
        assert f"?endpoint={endpoint}" in choices


def test_it_finds_a_usage_row_by_its_request_id(operator_client: Client, alice: Any) -> None:
    wanted = usage_row(alice.tenant, request_id="3f2b9c0e8a7d4e21")
    usage_row(alice.tenant, request_id="3f2b9c0e8a7d4e2")
    usage_row(alice.tenant, request_id="other")

    response = operator_client.get("/admin/accounts/usagelog/", {"q": " 3f2b9c0e8a7d4e21 "})

    assert changelist_ids(response) == [wanted.pk]


def test_it_lists_usage_logs_with_the_same_few_queries_however_many_tenants_and_callers(
    operator_client: Client, django_user_model: Any, django_assert_max_num_queries: Any
) -> None:
    def seed(count: int) -> None:
        for number in range(count):
            tenant = services.create_tenant(name=f"Tenant {number}")
            user = django_user_model.objects.create_user(username=f"user-{count}-{number}")
            api_key, _ = services.create_api_key(tenant=tenant, name=f"key {number}")
            usage_row(tenant, user=user)
            usage_row(tenant, api_key=api_key)

    def queries_for_a_page() -> int:
        operator_client.get("/admin/accounts/usagelog/")  # warm: sessions, content types
        with CaptureQueriesContext(connection) as queries:
            response = operator_client.get("/admin/accounts/usagelog/")
        assert response.status_code == 200
        return len(queries)

    seed(2)
    few = queries_for_a_page()
    seed(48)  # 100 rows across 50 tenants, users and keys: one full page
    many = queries_for_a_page()

    assert many == few
    with django_assert_max_num_queries(12):
        response = operator_client.get("/admin/accounts/usagelog/")
    html = response.content.decode()
    callers = re.findall(r'<td class="field-caller">([^<]*)</td>', html)
    assert sum(caller.startswith(f"key {settings.API_KEY_PREFIX}_") for caller in callers) == 50
    assert sum(caller.startswith("user-") for caller in callers) == 50
    assert len(response.context["cl"].result_list) == 100


def test_it_numbers_a_huge_unfiltered_log_from_the_planner_estimate(alice: Any) -> None:
    for _ in range(30):
        usage_row(alice.tenant)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {UsageLog._meta.db_table}")
    everything = UsageLog.objects.order_by("-created_at")

    class SmallThreshold(UsageLogPaginator):
        estimate_above = 10

    assert SmallThreshold(everything, 100).count == 30  # the estimate, after ANALYZE
    with CaptureQueriesContext(connection) as queries:
        SmallThreshold(everything, 100).count  # noqa: B018 (the property runs the query)
    assert "COUNT(*)" not in " ".join(query["sql"] for query in queries)
    # Filtered, or small: always exact.
    filtered = everything.filter(status_code=500)
    assert SmallThreshold(filtered, 100).count == 0
    assert UsageLogPaginator(everything, 100).count == 30
    assert UsageLogAdmin.show_full_result_count is False
