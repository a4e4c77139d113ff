"""Admin login throttling (django-axes): password guessing stops, and operators always get back in.

Every login here is a real POST of the admin's own form to /admin/login/ through Django's test
client, on PostgreSQL. Time does not pass by sleeping: the failed attempts axes recorded are
aged instead, as if the cool-off had gone by.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.db.models import F
from django.test import Client

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"  # the conftest operator's
FAILURE_LIMIT = 3
COOL_OFF = timedelta(minutes=10)


@pytest.fixture(autouse=True)
def throttling(settings: Any) -> None:
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = FAILURE_LIMIT
    settings.AXES_COOLOFF_TIME = COOL_OFF
    settings.AXES_TRUSTED_PROXY_COUNT = 0
    # Every guess hashes a password; the slow production hasher is not what is tested here.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def log_in(client: Client, password: str, *, username: str = "operator", **headers: Any) -> Any:
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": username, "password": password},
        **headers,
    )


def logged_in(response: Any) -> bool:
    return bool(response.status_code == 302 and response["Location"] == "/admin/")


def refused_as_locked_out(response: Any) -> bool:
    return response.status_code == 429 and "too many login attempts" in response.content.decode()


def guess_until_locked_out(client: Client, **headers: Any) -> None:
    """Wrong passwords up to the limit: each is answered by the form, until the last."""
    for _ in range(FAILURE_LIMIT - 1):
        response = log_in(client, "wrong password", **headers)
        assert response.status_code == 200
        assert "Please enter the correct username and password" in response.content.decode()
    assert refused_as_locked_out(log_in(client, "wrong password", **headers))


def let_time_pass(duration: timedelta) -> None:
    AccessAttempt.objects.update(attempt_time=F("attempt_time") - duration)


def test_it_locks_out_password_guessing_and_lets_the_operator_in_after_the_cool_off(
    operator: Any,
) -> None:
    client = Client()
    guess_until_locked_out(client)

    # The next guess is refused without a look at the password, the right one included.
    wrong = log_in(client, "yet another guess")
    assert refused_as_locked_out(wrong)
    assert wrong["Retry-After"] == str(int(COOL_OFF.total_seconds()))
    assert refused_as_locked_out(log_in(client, PASSWORD))
    assert client.get("/admin/").status_code == 302  # still not logged in
    (attempt,) = AccessAttempt.objects.all()
    assert attempt.failures_since_start == FAILURE_LIMIT  # refused guesses do not extend the lock
    assert PASSWORD not in attempt.post_data

    let_time_pass(COOL_OFF - timedelta(seconds=10))
    assert refused_as_locked_out(log_in(client, PASSWORD))
    let_time_pass(timedelta(seconds=20))
    assert logged_in(log_in(client, PASSWORD))
    assert client.get("/admin/").status_code == 200


def test_it_forgets_failures_after_a_successful_login(operator: Any) -> None:
    client = Client()
    for _ in range(FAILURE_LIMIT - 1):
        assert log_in(client, "typo").status_code == 200
    assert logged_in(log_in(client, PASSWORD))
    client.logout()
    for _ in range(FAILURE_LIMIT - 1):
        assert log_in(client, "typo").status_code == 200
    assert logged_in(log_in(client, PASSWORD))


def test_it_locks_one_username_at_one_address_only(operator: Any, django_user_model: Any) -> None:
    attacker = {"REMOTE_ADDR": "203.0.113.66"}
    guess_until_locked_out(Client(), **attacker)
    assert refused_as_locked_out(log_in(Client(), PASSWORD, **attacker))

    # The operator, from their own address, is not locked out by someone else's guessing...
    assert logged_in(log_in(Client(), PASSWORD, REMOTE_ADDR="198.51.100.7"))
    # ...nor is another operator at the attacker's address.
    django_user_model.objects.create_superuser("second", "second@example.com", "another secret")
    assert logged_in(log_in(Client(), "another secret", username="second", **attacker))


def test_it_ignores_x_forwarded_for_unless_told_to_trust_a_proxy(operator: Any) -> None:
    guess_until_locked_out(Client(), HTTP_X_FORWARDED_FOR="192.0.2.1")
    # A client that makes up a new X-Forwarded-For for every guess is still the same address.
    assert refused_as_locked_out(log_in(Client(), "guess", HTTP_X_FORWARDED_FOR="192.0.2.99"))


def test_it_takes_the_client_address_from_a_trusted_proxy(operator: Any, settings: Any) -> None:
    settings.AXES_TRUSTED_PROXY_COUNT = 1
    proxy = {"REMOTE_ADDR": "10.0.0.2"}  # every request arrives from the proxy
    attacker = {**proxy, "HTTP_X_FORWARDED_FOR": "203.0.113.66"}
    guess_until_locked_out(Client(), **attacker)

    # Forged entries to the left of the proxy's own do not make the attacker someone else.
    forged = {**proxy, "HTTP_X_FORWARDED_FOR": "198.51.100.7, 203.0.113.66"}
    assert refused_as_locked_out(log_in(Client(), PASSWORD, **forged))
    # The operator, behind the same proxy from another address, logs in.
    operator_request = {**proxy, "HTTP_X_FORWARDED_FOR": "198.51.100.7"}
    assert logged_in(log_in(Client(), PASSWORD, **operator_request))
    (attempt,) = AccessAttempt.objects.all()
    assert attempt.ip_address == "203.0.113.66"


@pytest.mark.parametrize(
    ("command", "args"),
    [("axes_reset_username", ["operator"]), ("axes_reset", [])],
)
def test_it_ends_a_lockout_at_once_with_a_management_command(
    operator: Any, command: str, args: list[str]
) -> None:
    client = Client()
    guess_until_locked_out(client)
    assert refused_as_locked_out(log_in(client, PASSWORD))

    call_command(command, *args, stdout=open(os.devnull, "w"))  # noqa: SIM115

    assert not AccessAttempt.objects.exists()
    assert logged_in(log_in(client, PASSWORD))


def test_it_refuses_a_cool_off_that_would_lock_out_for_good(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DATA_DIR": str(tmp_path / "data"),
        "ENV_FILE": str(tmp_path / "no.env"),
        "DJANGO_SETTINGS_MODULE": "embedplatform.settings",
        "AXES_COOLOFF_MINUTES": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "AXES_COOLOFF_MINUTES must be above 0" in result.stderr


def test_it_shows_operators_the_recorded_attempts_in_the_admin(
    operator: Any, operator_client: Client
) -> None:
    guess_until_locked_out(Client(), REMOTE_ADDR="203.0.113.66")
    page = operator_client.get("/admin/axes/accessattempt/")
    assert page.status_code == 200
    assert "203.0.113.66" in page.content.decode()
