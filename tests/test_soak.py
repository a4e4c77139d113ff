"""A one-minute bench/soak.py: mixed traffic from four tenants on a real gunicorn with its own
PostgreSQL and Redis, through a Redis restart, a PostgreSQL restart, a HUP and a SIGTERM plus
restart; every tenant's ledger must balance, with no 5xx but 503s and no traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.service import ROOT


@pytest.mark.service
def test_it_keeps_every_tenants_ledger_balanced_through_restarts_and_signals() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "bench/soak.py",
            "--seconds",
            "60",
            "--workers",
            "1",
            "--clients-per-tenant",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "soak: PASS" in output
    for event in ("restart redis", "restart postgresql", "gunicorn HUP", "gunicorn SIGTERM"):
        assert event in output
    served = re.search(r"^\s+200: (\d+)$", output, re.MULTILINE)
    assert served is not None, output
    assert int(served.group(1)) > 0
