"""The operator's test kit (scripts/test_api.sh and scripts/test_with_token.py), run as an operator
would against a live gunicorn: they pass with a valid token and fail loudly with a bad one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import jwt
import pytest

from tests.conftest import Person
from tests.service import ROOT, Service, start_service

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]

METRICS_TOKEN = "test-kit-metrics-token"


@pytest.fixture(scope="module")
def service(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    started = start_service(
        tmp_path_factory.mktemp("test-kit"),
        env={"MODEL_QUANTIZATION": "fp32", "METRICS_TOKEN": METRICS_TOKEN},
    )
    yield started
    started.stop()


@pytest.fixture
def operator(alice: Person) -> Person:
    # Both scripts in a row are more requests than the default minute allows.
    alice.tenant.requests_per_minute = 10_000
    alice.tenant.save(update_fields=["requests_per_minute"])
    return alice


def run_kit(command: list[str], service: Service, token: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "BASE_URL": service.url,
        "JWT_TOKEN": token,
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )


def curl_kit() -> list[str]:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (Debian package `curl`); scripts/test_api.sh needs it")
    return ["bash", str(ROOT / "scripts" / "test_api.sh")]


# -S -I: no site-packages at all, which proves the script needs nothing but the standard library.
PYTHON_KIT = [sys.executable, "-S", "-I", str(ROOT / "scripts" / "test_with_token.py")]


def check_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("ok ", "FAIL "))]


def test_it_passes_the_curl_checks_with_a_valid_token(service: Service, operator: Person) -> None:
    result = run_kit(curl_kit(), service, operator.token)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = check_lines(result.stdout)
    assert len(lines) == 11
    assert all(line.startswith("ok ") for line in lines), result.stdout
    assert "summary: all 11 checks" in result.stdout


def test_it_passes_the_integration_run_with_a_valid_token(
    service: Service, operator: Person
) -> None:
    result = run_kit(PYTHON_KIT, service, operator.token)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = check_lines(result.stdout)
    assert len(lines) == 9
    assert all(line.startswith("ok ") for line in lines), result.stdout
    assert "summary: all 9 checks" in result.stdout


def signed_with_another_secret(person: Person) -> str:
    """What a client gets when the API's SUPABASE_JWT_SECRET is not its project's."""
    claims = {
        "sub": person.subject,
        "email": person.email,
        "aud": "authenticated",
        "role": "authenticated",
        "exp": int(time.time()) + 3600,
    }
    return jwt.encode(
        claims, "not-the-projects-secret-but-long-enough-for-hs256", algorithm="HS256"
    )


@pytest.mark.parametrize("kit", ["curl", "python"])
@pytest.mark.parametrize("bad_token", ["garbage", "wrong-secret"])
def test_it_fails_with_a_bad_token(
    service: Service, operator: Person, kit: str, bad_token: str
) -> None:
    command = curl_kit() if kit == "curl" else PYTHON_KIT
    token = "not-a-valid-token" if bad_token == "garbage" else signed_with_another_secret(operator)
    result = run_kit(command, service, token)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in check_lines(result.stdout) if line.startswith("FAIL ")]
    # Everything that needs the token fails; what needs none (health, docs) still passes.
    assert len(failed) >= 4, result.stdout
    assert "FAILED" in result.stdout.splitlines()[-1]


def test_it_refuses_to_run_without_a_token(service: Service) -> None:
    for command in (curl_kit(), PYTHON_KIT):
        result = run_kit(command, service, "")
        assert result.returncode == 2
        assert "JWT_TOKEN" in result.stderr
