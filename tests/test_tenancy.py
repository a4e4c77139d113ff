"""Which tenant a request acts for: the user's default one, or the one X-Tenant names if the user
is a member; never another's, never an inactive one. Users appear just in time, once, however
many of their first requests arrive together. Staff may use the browsable API with their admin
session, CSRF enforced."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts import services
from accounts.jwt import mint_token
from accounts.models import Membership, Plan, SupabaseIdentity, Tenant, UsageLog
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error, at_once, embed

User = get_user_model()


def usage(person: Person, **headers: Any) -> Any:
    return Client().get("/usage", **person.client_headers, **headers)


@pytest.mark.django_db
def test_it_acts_for_the_users_default_tenant(
    alice: Person, bob: Person, fake_encoder: FakeEncoder
) -> None:
    assert embed(bob).status_code == 200
    assert usage(bob).json()["tenant"]["id"] == alice.tenant.pk
    (row,) = UsageLog.objects.all()
    assert (row.user, row.tenant) == (bob.user, alice.tenant)


@pytest.mark.django_db
def test_it_acts_for_the_tenant_named_by_x_tenant_when_the_user_is_a_member(
    alice: Person, bob: Person, fake_encoder: FakeEncoder
) -> None:
    side_project = services.create_tenant(name="Bob's side project", owner=bob.user)

    assert embed(bob, HTTP_X_TENANT=str(side_project.pk)).status_code == 200
    assert embed(bob).status_code == 200  # without the header: still alice's team, his default

    assert usage(bob, HTTP_X_TENANT=str(side_project.pk)).json()["tenant"]["id"] == side_project.pk
    assert list(UsageLog.objects.order_by("pk").values_list("tenant", flat=True)) == [
        side_project.pk,
        alice.tenant.pk,
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "requested",
    ["alice", "not-a-number", "99999999999999999999999", "²", "-1", "0"],
    ids=["another-tenant", "text", "huge-number", "unicode-digit", "negative", "zero"],
)
def test_it_refuses_an_x_tenant_the_user_is_not_a_member_of(
    alice: Person, charlie: Person, fake_encoder: FakeEncoder, requested: str
) -> None:
    value = str(alice.tenant.pk) if requested == "alice" else requested
    response = embed(charlie, HTTP_X_TENANT=value)
    error = assert_error(response, 403, error_type="permission_error", code="not_a_member")
    assert "Alice" not in error["message"]
    assert fake_encoder.texts_encoded == 0
    # Logged for charlie, who is known, charged to nobody.
    (row,) = UsageLog.objects.all()
    assert (row.user, row.tenant, row.tokens, row.status_code) == (charlie.user, None, 0, 403)
    assert_error(usage(charlie, HTTP_X_TENANT=value), 403, code="not_a_member")


@pytest.mark.django_db
def test_it_refuses_every_member_of_an_inactive_tenant(
    alice: Person, bob: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    Tenant.objects.filter(pk=alice.tenant.pk).update(is_active=False)
    for person in (alice, bob):
        assert_error(embed(person), 403, error_type="permission_error", code="tenant_inactive")
        assert_error(usage(person), 403, code="tenant_inactive")
    assert fake_encoder.texts_encoded == 0
    assert embed(charlie).status_code == 200
    refused = UsageLog.objects.filter(status_code=403)
    assert refused.count() == 2
    assert set(refused.values_list("tenant", "tokens", "error_type")) == {
        (alice.tenant.pk, 0, "permission_error")
    }


@pytest.mark.django_db
def test_it_gives_a_user_left_without_any_tenant_a_personal_one_again(
    alice: Person, bob: Person
) -> None:
    Membership.objects.filter(user=bob.user).delete()
    response = usage(bob)
    assert response.status_code == 200
    tenant = Tenant.objects.get(personal_owner=bob.user)
    assert response.json()["tenant"]["id"] == tenant.pk != alice.tenant.pk
    assert Membership.objects.get(user=bob.user).is_default


@pytest.mark.django_db(transaction=True)
def test_it_creates_one_user_and_one_tenant_for_many_concurrent_first_requests() -> None:
    """Three new Supabase users each send their first 12 requests at the same moment, on as
    many threads and PostgreSQL connections."""
    subjects = [str(uuid.uuid4()) for _ in range(3)]
    tokens = [
        mint_token(subject=subject, email=f"new-{n}@example.com")
        for n, subject in enumerate(subjects)
    ]
    jobs = [token for token in tokens for _ in range(12)]

    def first_request(token: str) -> tuple[str, int, int | None]:
        response = Client().get("/usage", HTTP_AUTHORIZATION=f"Bearer {token}")
        return token, response.status_code, response.json().get("tenant", {}).get("id")

    answers: list[tuple[str, int, int | None]] = at_once(first_request, jobs)

    assert None not in answers
    assert {status for _, status, _ in answers} == {200}
    for n, subject in enumerate(subjects):
        identity = SupabaseIdentity.objects.get(subject=subject)
        assert User.objects.filter(email=f"new-{n}@example.com").count() == 1
        assert Tenant.objects.filter(personal_owner=identity.user).count() == 1
        assert Membership.objects.filter(user=identity.user).count() == 1
        tenant_ids = {tenant for token, _, tenant in answers if token == tokens[n]}
        assert tenant_ids == {Tenant.objects.get(personal_owner=identity.user).pk}
    assert Tenant.objects.count() == 3


@pytest.mark.django_db
def test_it_makes_the_plan_named_default_the_default_again_when_no_plan_is(alice: Person) -> None:
    # An operator unticked "default" in the admin, meaning to tick another plan next.
    Plan.objects.update(is_default=False)
    Plan.objects.create(name="pro", monthly_token_quota=10**9)

    response = Client().get(
        "/usage", HTTP_AUTHORIZATION=f"Bearer {mint_token(subject=str(uuid.uuid4()), email='')}"
    )

    assert response.status_code == 200, response.content
    assert response.json()["plan"]["name"] == "default"
    assert list(Plan.objects.filter(is_default=True).values_list("name", flat=True)) == ["default"]
    assert Plan.objects.filter(name="default").count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_agrees_on_one_default_plan_when_concurrent_first_requests_find_none() -> None:
    Plan.objects.create(name="default", is_default=False)
    tokens = [mint_token(subject=str(uuid.uuid4()), email="") for _ in range(8)]

    def first_request(token: str) -> tuple[int, str | None]:
        response = Client().get("/usage", HTTP_AUTHORIZATION=f"Bearer {token}")
        return response.status_code, response.json().get("plan", {}).get("name")

    answers = at_once(first_request, tokens)

    assert answers == [(200, "default")] * len(tokens)
    default = Plan.objects.get(is_default=True)
    assert (default.name, Plan.objects.count()) == ("default", 1)
    assert set(Tenant.objects.values_list("plan", flat=True)) == {default.pk}


@pytest.mark.django_db
def test_it_lets_staff_use_their_admin_session_with_csrf(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    staff = User.objects.create_user("operator", "operator@example.com", "pw", is_staff=True)
    services.add_member(tenant=alice.tenant, user=staff)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)

    assert client.get("/usage").json()["tenant"]["id"] == alice.tenant.pk
    without_csrf = client.post("/embed", {"text": "hi"}, content_type="application/json")
    assert_error(without_csrf, 403, error_type="permission_error")
    assert "CSRF" in without_csrf.json()["error"]["message"]
    assert fake_encoder.texts_encoded == 0

    csrf = "a" * 32
    client.cookies["csrftoken"] = csrf
    with_csrf = client.post(
        "/embed", {"text": "hi"}, content_type="application/json", HTTP_X_CSRFTOKEN=csrf
    )
    assert with_csrf.status_code == 200, with_csrf.content
    assert UsageLog.objects.get(status_code=200).user == staff


@pytest.mark.django_db
def test_it_does_not_take_a_non_staff_session_as_a_credential(alice: Person) -> None:
    person = User.objects.create_user("someone", "someone@example.com", "pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(person)
    response = client.post("/embed", {"text": "hi"}, content_type="application/json")
    assert_error(response, 401, error_type="authentication_error", code="missing_credentials")
    assert_error(client.get("/usage"), 401, code="missing_credentials")


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["1\x00", "\x00", "12\x07", "\x1b[31m1", "1\x7f"])
def test_it_refuses_an_x_tenant_with_control_characters_before_any_query(
    alice: Person, fake_encoder: FakeEncoder, value: str
) -> None:
    value = value.replace("1", str(alice.tenant.pk), 1)
    with CaptureQueriesContext(connection) as queries:
        error = assert_error(embed(alice, HTTP_X_TENANT=value), 403, code="invalid_tenant")
    assert not [query for query in queries if value in query["sql"]]
    assert "control characters" in error["message"]
    _, key = services.create_api_key(tenant=alice.tenant, name="ci")
    response = Client().post(
        "/embed",
        {"text": "hello world"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
        HTTP_X_TENANT=value,
    )
    assert_error(response, 403, error_type="permission_error", code="invalid_tenant")
    assert fake_encoder.texts_encoded == 0
    # Logged as the caller's refusals, charged nothing; the header's value was never queried.
    assert set(UsageLog.objects.values_list("status_code", "tokens")) == {(403, 0)}
    assert_error(usage(alice, HTTP_X_TENANT=value), 403, code="invalid_tenant")
