"""The tools that get a person a token: `manage.py mint_dev_token` for local development, and
`scripts/get_token.sh`, which logs into a Supabase project (here a local fake of its Auth API,
tests/jwks_server.py) and prints the access token."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from accounts.models import SupabaseIdentity
from tests.jwks_server import FakeSupabase
from tests.service import ROOT, free_port

GET_TOKEN = ROOT / "scripts" / "get_token.sh"


def usage(token: str) -> Any:
    return Client().get("/usage", HTTP_AUTHORIZATION=f"Bearer {token}")


def mint(**options: Any) -> str:
    out = io.StringIO()
    call_command("mint_dev_token", stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue().strip()


# --- mint_dev_token ----------------------------------------------------------------------------


def test_it_refuses_to_mint_a_dev_token_with_debug_off(settings: Any) -> None:
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DEBUG"):
        mint()


@pytest.mark.django_db
def test_it_mints_a_dev_token_shaped_like_supabases_that_the_service_accepts(
    settings: Any,
) -> None:
    settings.DEBUG = True
    settings.SUPABASE_URL = ""
    token = mint(email="dev@example.com", ttl=600)

    header = pyjwt.get_unverified_header(token)
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert claims["exp"] - claims["iat"] == 600
    assert {claims["aud"], claims["role"], claims["email"]} == {
        "authenticated",
        "dev@example.com",
    }
    assert claims["is_anonymous"] is False
    assert {"sub", "iss", "session_id", "aal", "amr", "app_metadata"} <= set(claims)
    assert usage(token).status_code == 200
    # The same e-mail is the same user next time; --sub picks one.
    assert subject_of(mint(email="dev@example.com")) == claims["sub"]
    assert SupabaseIdentity.objects.get().subject == claims["sub"]
    assert subject_of(mint(sub="chosen-subject")) == "chosen-subject"


def subject_of(token: str) -> str:
    return str(pyjwt.decode(token, options={"verify_signature": False})["sub"])


@pytest.mark.django_db
def test_it_mints_with_debug_off_when_forced(settings: Any) -> None:
    settings.DEBUG = False
    assert usage(mint(force=True)).status_code == 200


@pytest.mark.django_db
def test_it_mints_tokens_the_embedded_default_accepts(settings: Any, tmp_path: Path) -> None:
    """No Supabase configured at all: the command and the service share the development secret
    generated in DATA_DIR."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SUPABASE_", "DJANGO_SETTINGS_MODULE", "DEBUG"))
    }
    env.update(DATA_DIR=str(tmp_path), DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    command = [sys.executable, "manage.py", "mint_dev_token", "--email", "dev@example.com"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    refused, minted = run(), run("--force")

    assert refused.returncode != 0
    assert "DEBUG" in refused.stderr
    assert not refused.stdout
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert usage(token).status_code == 401  # not this test run's secret...
    settings.SUPABASE_URL = ""
    settings.SUPABASE_JWT_SECRET = (tmp_path / "dev_jwt_secret").read_text().strip()
    assert usage(token).status_code == 200  # ...but the service's on that DATA_DIR


# --- scripts/get_token.sh ----------------------------------------------------------------------


def get_token(
    project: FakeSupabase | None, *, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "ENV_FILE": "/nonexistent/.env",
    }
    if project is not None:
        full_env.update(SUPABASE_URL=project.url, SUPABASE_ANON_KEY=project.anon_key)
    full_env.update(env)
    return subprocess.run(
        ["bash", str(GET_TOKEN)],
        input=stdin,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.django_db
def test_it_logs_into_supabase_and_prints_the_access_token(supabase: FakeSupabase) -> None:
    supabase.add_key("ES256")
    subject = supabase.add_user("erin@example.com", 'pa ss"word$(x)')

    result = get_token(supabase, EMAIL="erin@example.com", PASSWORD='pa ss"word$(x)')

    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    (request,) = supabase.login_requests
    assert request.query == {"grant_type": ["password"]}
    assert request.headers["apikey"] == supabase.anon_key
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {"email": "erin@example.com", "password": 'pa ss"word$(x)'}
    assert pyjwt.get_unverified_header(token)["alg"] == "ES256"
    # The token is a real one for this service: the user appears on first use.
    assert usage(token).status_code == 200
    assert SupabaseIdentity.objects.get(subject=subject).email == "erin@example.com"


def test_it_asks_for_the_email_and_password(supabase: FakeSupabase) -> None:
    supabase.add_user("finn@example.com", "secret-1")
    result = get_token(supabase, stdin="finn@example.com\nsecret-1\n")
    assert result.returncode == 0, result.stderr
    claims = pyjwt.decode(result.stdout.strip(), options={"verify_signature": False})
    assert claims["email"] == "finn@example.com"


def test_it_reads_the_project_from_the_env_file(supabase: FakeSupabase, tmp_path: Path) -> None:
    supabase.add_user("gus@example.com", "secret-2")
    env_file = tmp_path / ".env"
    env_file.write_text(
        f'SUPABASE_URL="{supabase.url}"\nexport SUPABASE_ANON_KEY={supabase.anon_key}\n'
    )
    result = get_token(None, ENV_FILE=str(env_file), EMAIL="gus@example.com", PASSWORD="secret-2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2


def test_it_says_why_a_login_failed(supabase: FakeSupabase) -> None:
    supabase.add_user("hal@example.com", "right")
    result = get_token(supabase, EMAIL="hal@example.com", PASSWORD="wrong")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Login failed (HTTP 400): Invalid login credentials" in result.stderr
    assert "wrong" not in result.stderr

    bad_key = get_token(
        supabase, SUPABASE_ANON_KEY="not-the-anon-key", EMAIL="hal@example.com", PASSWORD="right"
    )
    assert bad_key.returncode == 1
    assert "Invalid API key" in bad_key.stderr


def test_it_says_what_is_missing_or_unreachable() -> None:
    unconfigured = get_token(None, EMAIL="a@example.com", PASSWORD="b")
    assert unconfigured.returncode == 2
    assert "SUPABASE_URL" in unconfigured.stderr
    unreachable = get_token(
        None,
        SUPABASE_URL=f"http://127.0.0.1:{free_port()}",
        SUPABASE_ANON_KEY="anon",
        EMAIL="a@example.com",
        PASSWORD="b",
    )
    assert unreachable.returncode == 1
    assert "Could not reach" in unreachable.stderr
