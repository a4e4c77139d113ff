"""A real gunicorn process serving the project, for tests that go over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url() -> str:
    """The URL of the database the test session uses (pytest-django's test_ database), so the
    service sees the rows a test committed."""
    db = settings.DATABASES["default"]
    if "sqlite" in db["ENGINE"]:
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgresql://{user}{password}@{host}:{port}/{db['NAME']}"


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The log's JSON lines, parsed (anything else gunicorn printed is left out)."""
        records = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_service(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    workers: int | None = 1,
    wait: bool = True,
    ready_timeout: float = 120,
) -> Service:
    """Starts gunicorn with the project's gunicorn.conf.py on a free port and waits until
    /health answers 200 (or the process exits, which fails the caller's test)."""
    port = free_port()
    log_path = tmp_path / f"gunicorn-{port}.log"
    metrics_dir = tmp_path / f"metrics-{port}"
    metrics_dir.mkdir()
    full_env = {
        **os.environ,
        "PORT": str(port),
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "DATABASE_URL": database_url(),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "DATA_DIR": str(settings.DATA_DIR),
        "SUPABASE_JWT_SECRET": settings.SUPABASE_JWT_SECRET,
        "SECRET_KEY": settings.SECRET_KEY,
        "CACHE_KEY_PREFIX": settings.CACHES["default"].get("KEY_PREFIX", "embedplatform"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # The test process itself never loads a model at start; the service must.
        "MODEL_LOAD_ON_START": "true",
        **(env or {}),
    }
    full_env.pop("DJANGO_SETTINGS_MODULE", None)
    if workers is None:  # gunicorn.conf.py's default for this machine
        full_env.pop("WEB_CONCURRENCY", None)
    else:
        full_env["WEB_CONCURRENCY"] = str(workers)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "embedplatform/gunicorn.conf.py"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service(
        process=process, url=f"http://127.0.0.1:{port}", log_path=log_path, env=full_env
    )
    if wait:
        wait_until_healthy(service, timeout=ready_timeout)
    return service


def wait_until_healthy(service: Service, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"gunicorn exited with {service.process.returncode}:\n{service.log()}"
            )
        try:
            response = requests.get(service.url + "/health", timeout=2)
            if response.status_code == 200:
                return
            last = response.text
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.2)
    service.stop(signal.SIGKILL)
    raise RuntimeError(
        f"gunicorn did not become healthy in {timeout}s (last /health: {last}):\n{service.log()}"
    )
