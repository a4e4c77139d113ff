"""The dashboard's percentiles: interpolated between ranks, the same in Python, SQLite and
PostgreSQL, and the dashboard rendered on the embedded SQLite default."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from accounts import dashboard_selectors as usage
from accounts.models import UsageLog
from tests.conftest import usage_row

ROOT = Path(__file__).resolve().parent.parent


def test_it_computes_percentiles_by_interpolating_between_ranks() -> None:
    assert usage.percentile_cont([], 0.95) is None
    assert usage.percentile_cont([42.0], 0.95) == 42.0
    assert usage.percentile_cont([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert usage.percentile_cont([float(n) for n in range(1, 21)], 0.95) == pytest.approx(19.05)
    assert usage.percentile_cont([1.0, 2.0], 1.0) == 2.0
    assert usage.percentile_cont([1.0, 2.0], 0.0) == 1.0


@pytest.mark.django_db
def test_it_computes_the_portable_figures_as_postgresql_does(alice: Any, charlie: Any) -> None:
    """The fallback for databases without percentile_cont (the embedded SQLite), run here on
    PostgreSQL, agrees day by day with percentile_cont."""
    rng = random.Random(3)
    now = timezone.now()
    for _ in range(400):
        usage_row(
            rng.choice([alice.tenant, charlie.tenant]),
            tokens=rng.randint(0, 50),
            status_code=rng.choice([200, 200, 200, 429]),
            latency_ms=round(rng.lognormvariate(3, 1), 3),
            created_at=now - timedelta(days=rng.randint(0, 5), minutes=rng.randint(0, 600)),
        )
    assert connection.vendor == "postgresql"

    for tenant in (alice.tenant, None):
        in_postgresql = usage.usage_window(tenant=tenant)
        logs = UsageLog.objects.filter(created_at__gte=usage.window_start())
        by_day, overall = usage.daily_usage_portable(
            logs.filter(tenant=tenant) if tenant else logs,
            first_day=in_postgresql.start,
            days=usage.WINDOW_DAYS,
        )

        busy_days = [day for day in in_postgresql.days if day.requests]
        assert len(busy_days) >= 5
        assert sorted(by_day) == [day.day for day in busy_days]
        for day in busy_days:
            portable = by_day[day.day]
            assert (portable.requests, portable.tokens, portable.errors) == (
                day.requests,
                day.tokens,
                day.errors,
            )
            assert portable.p95_latency_ms == pytest.approx(day.p95_latency_ms, rel=1e-9)
        assert overall == pytest.approx(in_postgresql.p95_latency_ms, rel=1e-9)


def test_it_renders_the_dashboard_on_the_embedded_sqlite_default(tmp_path: Path) -> None:
    """SQLite has no percentile_cont: the pages must work there all the same."""
    script = textwrap.dedent(
        """
        import django
        django.setup()
        from django.test.utils import setup_test_environment
        setup_test_environment()  # the test client then records the template context
        from datetime import timedelta
        from django.core.management import call_command
        from django.contrib.auth.models import User
        from django.test import Client
        from django.utils import timezone
        from accounts import services
        from accounts.models import UsageLog

        call_command("migrate", verbosity=0)
        tenant = services.create_tenant(name="Lite tenant")
        now = timezone.now()
        for n, latency in enumerate(range(10, 30)):
            UsageLog.objects.create(tenant=tenant, endpoint="embed", tokens=5, status_code=200,
                                    latency_ms=float(latency), request_id=f"r{n}", created_at=now)
        UsageLog.objects.create(tenant=tenant, endpoint="embed", tokens=0, status_code=429,
                                latency_ms=1.0, request_id="late",
                                created_at=now - timedelta(days=2))
        client = Client()
        client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
        overview = client.get("/admin/usage/")
        page = client.get(f"/admin/usage/tenant/{tenant.pk}/")
        log = client.get("/admin/accounts/usagelog/")
        window = page.context["window"]
        print("STATUS", overview.status_code, page.status_code, log.status_code)
        print("FIGURES", window.requests, window.tokens, window.errors,
              window.days[-1].p95_latency_ms)
        """
    )
    env = {
        key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="embedplatform.settings",
        DATA_DIR=str(tmp_path),
        ALLOWED_HOSTS="testserver",
        MODEL_LOAD_ON_START="false",
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "db.sqlite3").exists()
    assert "STATUS 200 200 200" in result.stdout, result.stdout + result.stderr[-3000:]
    # 10..29 ms: percentile_cont(0.95) = 10 + 0.95 * 19
    assert "FIGURES 21 100 1 28.05" in result.stdout, result.stdout
