"""deploy/kubernetes/: the kustomize base and the example overlay, built with `kubectl kustomize`
and validated against the Kubernetes schema with kubernetes-validate (both from
requirements-dev.txt), then checked for what a scale-out deployment needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.service import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -r requirements-dev.txt")
    return found


def kustomize(folder: Path) -> str:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def documents(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    return documents(kustomize(BASE))


@pytest.fixture(scope="module")
def overlay() -> dict[tuple[str, str], dict[str, Any]]:
    return documents(kustomize(OVERLAY))


@pytest.mark.parametrize("folder", [BASE, OVERLAY], ids=["base", "overlay"])
def test_it_builds_manifests_that_the_kubernetes_schema_accepts(
    folder: Path, tmp_path: Path
) -> None:
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(kustomize(folder))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(manifests)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = re.findall(r"passed for resource (\S+)", output)
    kinds = {name.split("/")[0] for name in passed}
    assert {"deployment", "service", "horizontalpodautoscaler", "poddisruptionbudget"} <= kinds
    assert {"job", "configmap", "secret"} <= kinds
    # The only resource without a Kubernetes schema is the Prometheus Operator's ServiceMonitor.
    unknown = re.findall(r"Couldn't find schema for kind (\w+)", output)
    assert set(unknown) <= {"ServiceMonitor"}, output


def api_container(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod = manifests["Deployment", "embedplatform"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def test_it_probes_readiness_on_health_and_never_kills_a_worker_loading_its_model(
    base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    container = api_container(base)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # /health is 503 while a model loads or the database is down: liveness must not use it.
    assert "tcpSocket" in container["livenessProbe"]
    startup = container["startupProbe"]
    # The first start may download EmbeddingGemma (1.2 GB) before gunicorn listens.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def graceful_timeout_default() -> int:
    text = (ROOT / "embedplatform" / "gunicorn.conf.py").read_text()
    match = re.search(r'"GUNICORN_GRACEFUL_TIMEOUT",\s*(\d+)', text)
    assert match is not None
    return int(match.group(1))


def test_it_gives_requests_in_flight_gunicorns_graceful_timeout_to_finish(
    base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = base["Deployment", "embedplatform"]["spec"]["template"]["spec"]
    container = api_container(base)
    env = {e["name"]: e["value"] for e in container["env"]}
    graceful = int(env.get("GUNICORN_GRACEFUL_TIMEOUT", graceful_timeout_default()))
    assert graceful == graceful_timeout_default()
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Endpoints drop the pod during preStop; then gunicorn gets SIGTERM and its graceful timeout.
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + graceful
    assert pod["terminationGracePeriodSeconds"] <= int(pre_stop[1]) + graceful + 15


def test_it_runs_non_root_on_a_read_only_root_with_writable_volumes_where_needed(
    base: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = base["Deployment", "embedplatform"]["spec"]["template"]["spec"]
    container = api_container(base)
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The image's own user (Dockerfile: USER 10001:10001).
    assert pod["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    # The model cache, the app's data, and /tmp (Prometheus's multiprocess files, HOME).
    assert set(mounts) == {"/data/hf", "/data/app", "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == set(mounts.values())
    assert "emptyDir" in volumes[mounts["/data/hf"]]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]


def test_it_shares_one_model_cache_between_pods_in_the_example(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = overlay["Deployment", "embedplatform"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    assert overlay["PersistentVolumeClaim", claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_it_routes_scales_and_protects_the_api_pods(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = overlay["Deployment", "embedplatform"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    service = overlay["Service", "embedplatform"]
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = overlay["PodDisruptionBudget", "embedplatform"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = overlay["HorizontalPodAutoscaler", "embedplatform"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "embedplatform",
    }
    assert hpa["minReplicas"] >= 2
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # The HPA can only compute utilisation against a CPU request.
    assert api_container(overlay)["resources"]["requests"]["cpu"]
    ingress = overlay["Ingress", "embedplatform"]["spec"]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "embedplatform", "port": {"name": "http"}}
    assert {d["metadata"].get("namespace") for k, d in overlay.items() if k[0] != "Namespace"} == {
        "embedplatform"
    }


def test_it_migrates_in_a_job_with_the_same_image_and_settings(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    api = api_container(overlay)
    assert api["image"] == "registry.example.com/embedplatform:1.0.0"
    (migrate,) = overlay["Job", "embedplatform-migrate"]["spec"]["template"]["spec"]["containers"]
    assert migrate["image"] == api["image"]
    assert migrate["envFrom"] == api["envFrom"]
    env = {e["name"]: e["value"] for e in migrate["env"]}
    assert env["RUN_MIGRATIONS"] == "true"
    assert overlay["ConfigMap", "embedplatform"]["data"]["RUN_MIGRATIONS"] == "false"
    # The image's entrypoint runs docker/migrate.py (advisory-locked), then this command.
    assert "command" not in migrate
    assert migrate["args"] == ["true"]


def test_it_takes_settings_and_secrets_that_the_service_documents(
    base: dict[tuple[str, str], dict[str, Any]],
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    config = base["ConfigMap", "embedplatform"]["data"]
    secret = base["Secret", "embedplatform"]["stringData"]
    assert set(config) | set(secret) <= documented
    # The base's Secret is a template; the example overlay fills it in.
    assert "REPLACE_ME" in secret["SECRET_KEY"]
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "METRICS_TOKEN"} <= set(secret)
    filled = overlay["Secret", "embedplatform"]["stringData"]
    assert not any("REPLACE_ME" in value for value in filled.values())
    # The overlay's ConfigMap patch merges into the base's.
    assert set(overlay["ConfigMap", "embedplatform"]["data"]) == set(config)


def test_it_lets_prometheus_scrape_every_replica_with_the_metrics_token(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    template = overlay["Deployment", "embedplatform"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == "8000"
    monitor = overlay["ServiceMonitor", "embedplatform"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = overlay["Service", "embedplatform"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["key"] in overlay["Secret", credentials["name"]]["stringData"]
