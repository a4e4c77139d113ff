"""The configuration warnings are system checks: `manage.py check --deploy` lists them."""

from __future__ import annotations

from io import StringIO

from django.core.management import call_command
from django.test import override_settings

from embedplatform.checks import RATE_LIMITS_USE_LOCAL_CACHE, SUPABASE_NOT_CONFIGURED


def deploy_check_output() -> str:
    # Warnings go to stderr; only errors would fail the command.
    out, err = StringIO(), StringIO()
    call_command("check", deploy=True, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def plain_check_output() -> str:
    out, err = StringIO(), StringIO()
    call_command("check", stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def test_it_lists_rate_limits_counted_per_process_in_the_deploy_check() -> None:
    with override_settings(REDIS_URL=""):
        assert RATE_LIMITS_USE_LOCAL_CACHE in deploy_check_output()
        # Development (a plain check, migrate, runserver) on the embedded default stays quiet.
        assert RATE_LIMITS_USE_LOCAL_CACHE not in plain_check_output()
    with override_settings(REDIS_URL="redis://127.0.0.1:6379/0"):
        assert RATE_LIMITS_USE_LOCAL_CACHE not in deploy_check_output()


def test_it_lists_a_missing_supabase_configuration_in_the_deploy_check() -> None:
    with override_settings(DEBUG=False, SUPABASE_JWT_SECRET_GENERATED=True):
        output = deploy_check_output()
        assert SUPABASE_NOT_CONFIGURED in output
        assert "only development tokens" in output
        assert SUPABASE_NOT_CONFIGURED not in plain_check_output()
    # Development on the generated secret is what it is for; a configured project is fine.
    with override_settings(DEBUG=True, SUPABASE_JWT_SECRET_GENERATED=True):
        assert SUPABASE_NOT_CONFIGURED not in deploy_check_output()
    with override_settings(DEBUG=False, SUPABASE_JWT_SECRET_GENERATED=False):
        assert SUPABASE_NOT_CONFIGURED not in deploy_check_output()
