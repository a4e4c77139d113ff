"""Configuration: every variable is documented, and the embedded default needs none of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.test_ratelimit import start_log

ROOT = Path(__file__).resolve().parent.parent
# Variables the service reads; the original service's own must all be there.
ORIGINAL_VARIABLES = {
    "MODEL_NAME",
    "MODEL_QUANTIZATION",
    "MAX_BATCH_SIZE",
    "MAX_SEQ_LENGTH",
    "HF_TOKEN",
    "SUPABASE_JWT_SECRET",
    "SUPABASE_URL",
    "SUPABASE_ANON_KEY",
    "REDIS_URL",
    "RATE_LIMIT_PER_MIN",
    "DEBUG",
}
# Set by the service for itself or by the platform, not by operators.
INTERNAL = {"EMBEDPLATFORM_SERVING", "DJANGO_SETTINGS_MODULE", "HF_HUB_OFFLINE", "RUN_MAIN"}


def variables_read_by(path: Path) -> set[str]:
    text = path.read_text()
    names = set(re.findall(r"""env(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))
    names |= set(re.findall(r"""os\.environ(?:\.get)?[\[(]\s*["']([A-Z][A-Z0-9_]+)["']""", text))
    names |= set(re.findall(r"""_env_\w+\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", text))
    return names - INTERNAL


def documented() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {m.group(1) for line in lines if (m := re.match(r"^#?\s*([A-Z][A-Z0-9_]+)=", line))}


def settings_in_subprocess(env: dict[str, str]) -> dict[str, Any]:
    code = """
import json, os
os.environ["DJANGO_SETTINGS_MODULE"] = "embedplatform.settings"
import django
django.setup()
from django.conf import settings as s
print(json.dumps({
    "engine": s.DATABASES["default"]["ENGINE"], "cache": s.CACHES["default"]["BACKEND"],
    "model": s.MODEL_NAME, "secret": s.SECRET_KEY, "jwt": s.SUPABASE_JWT_SECRET,
    "generated": s.SUPABASE_JWT_SECRET_GENERATED, "debug": s.DEBUG,
    "quantization": s.MODEL_QUANTIZATION, "batch": s.MAX_BATCH_SIZE, "rpm": s.RATE_LIMIT_PER_MIN,
}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def bare_environment(tmp_path: Path) -> dict[str, str]:
    """Nothing but what any shell has, and no .env file."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DATA_DIR": str(tmp_path / "data"),
        "ENV_FILE": str(tmp_path / "no.env"),
    }


def test_it_documents_every_variable_it_reads_in_the_example_env_file() -> None:
    sources = [
        ROOT / "embedplatform" / "settings.py",
        ROOT / "embedplatform" / "gunicorn.conf.py",
        ROOT / "docker-compose.yml",
        *sorted(path for path in (ROOT / "docker").glob("*") if path.is_file()),
    ]
    read = set().union(*(variables_read_by(path) for path in sources))
    assert read >= ORIGINAL_VARIABLES
    undocumented = read - documented()
    assert not undocumented, undocumented


def test_it_runs_on_the_embedded_default_without_any_configuration(tmp_path: Path) -> None:
    first = settings_in_subprocess(bare_environment(tmp_path))
    assert first["engine"].endswith("sqlite3")
    assert first["cache"].endswith("LocMemCache")
    assert first["model"] == ""  # the bundled MiniLM
    assert first["debug"] is False
    assert first["quantization"] == "auto"
    assert first["generated"] is True
    assert len(str(first["secret"])) >= 50
    # Generated once and kept: a restart keeps sessions and development tokens valid.
    again = settings_in_subprocess(bare_environment(tmp_path))
    assert (again["secret"], again["jwt"]) == (first["secret"], first["jwt"])
    assert oct((tmp_path / "data" / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_it_reads_the_example_env_file_as_it_is(tmp_path: Path) -> None:
    env = {**bare_environment(tmp_path), "ENV_FILE": str(ROOT / ".env.example")}
    loaded = settings_in_subprocess(env)
    assert loaded["model"] == "google/embeddinggemma-300m"
    # Empty values in the file mean "not set": the defaults apply.
    assert loaded["engine"].endswith("sqlite3")
    assert loaded["batch"] == 32


def test_it_lets_the_environment_win_over_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("RATE_LIMIT_PER_MIN=5\nMAX_BATCH_SIZE=8\n")
    env = {**bare_environment(tmp_path), "ENV_FILE": str(env_file), "RATE_LIMIT_PER_MIN": "7"}
    loaded = settings_in_subprocess(env)
    assert (loaded["rpm"], loaded["batch"]) == (7, 8)


def test_it_uses_the_configured_jwt_secret_instead_of_generating_one(tmp_path: Path) -> None:
    env = {**bare_environment(tmp_path), "SUPABASE_JWT_SECRET": "project-secret"}
    loaded = settings_in_subprocess(env)
    assert (loaded["jwt"], loaded["generated"]) == ("project-secret", False)
    assert not (tmp_path / "data" / "dev_jwt_secret").exists()


def test_it_warns_at_start_when_it_serves_without_any_supabase_configuration(
    tmp_path: Path,
) -> None:
    unconfigured = {
        "SUPABASE_JWT_SECRET": "",
        "SUPABASE_URL": "",
        "DEBUG": "false",
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    assert "supabase_not_configured" in start_log(**unconfigured)
    # Development on the generated secret is what it is for; a configured project is fine.
    assert "supabase_not_configured" not in start_log(**{**unconfigured, "DEBUG": "true"})
    configured = {**unconfigured, "SUPABASE_JWT_SECRET": "project-secret"}
    assert "supabase_not_configured" not in start_log(**configured)
