"""GET /metrics: the service's own metrics with their labels and meaning, the optional
METRICS_TOKEN, and totals that add up across gunicorn workers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Sum
from django.test import Client
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from accounts.models import UsageLog
from embedplatform import metrics
from tests.conftest import FakeEncoder, Person
from tests.service import start_service

# name -> (type, label names of its samples, ignoring a histogram's `le`)
SERVICE_METRICS = {
    "embed_requests": ("counter", {"endpoint", "status"}),
    "embed_request_duration_seconds": ("histogram", {"endpoint"}),
    "embed_errors": ("counter", {"endpoint", "type"}),
    "embed_tokens": ("counter", {"endpoint"}),
    "embed_inputs": ("counter", {"endpoint"}),
    "embed_batch_size": ("histogram", set()),
    "embed_charge_group_size": ("histogram", set()),
    "embed_queue_wait_seconds": ("histogram", set()),
    "embed_rate_limited": ("counter", set()),
    "embed_quota_exceeded": ("counter", set()),
    "embed_model_info": ("gauge", {"model", "dtype", "dimensions"}),
    "embed_model_load_seconds": ("gauge", set()),
}


class Scrape:
    """One /metrics page, parsed by prometheus_client's own parser (so the page is valid)."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def samples(self, name: str) -> Iterable[Sample]:
        for family in self.families.values():
            yield from (sample for sample in family.samples if sample.name == name)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(
            sample.value
            for sample in self.samples(name)
            if all(sample.labels.get(key) == wanted for key, wanted in labels.items())
        )


def scrape_in_process(**headers: Any) -> Scrape:
    response = Client().get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return Scrape(response.content.decode())


def post(person: Person, path: str, body: Any) -> Any:
    return Client().post(
        path, json.dumps(body), content_type="application/json", **person.client_headers
    )


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


# --- What is exported ---------------------------------------------------------------------------


def test_it_exports_every_service_metric_with_its_type_and_labels_and_no_tenant(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    assert post(alice, "/embed", {"text": "one text"}).status_code == 200
    scrape = scrape_in_process()
    for name, (kind, labels) in SERVICE_METRICS.items():
        assert name in scrape.families, f"{name} is not exported"
        family = scrape.families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)
    for family in scrape.families.values():
        for sample in family.samples:
            assert "tenant" not in sample.labels, sample
    # django-prometheus's own request, database and cache metrics are on the same page.
    assert "django_http_requests_latency_seconds_by_view_method" in scrape.families
    assert "django_db_execute" in scrape.families
    assert "django_cache_get" in scrape.families


def test_it_counts_requests_tokens_inputs_and_errors_by_endpoint(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    before = scrape_in_process()
    one = post(alice, "/embed", {"text": "hello metrics"})
    many = post(alice, "/batch-embed", {"texts": ["a b", "c d e", "f"]})
    oai = post(alice, "/v1/embeddings", {"input": ["x", "y z"]})
    invalid = post(alice, "/embed", {"text": ""})
    anonymous = Client().post("/embed", "{}", content_type="application/json")
    after = scrape_in_process()

    assert [r.status_code for r in (one, many, oai, invalid, anonymous)] == [
        200,
        200,
        200,
        422,
        401,
    ]
    assert delta(before, after, "embed_requests_total", endpoint="embed", status="200") == 1
    assert delta(before, after, "embed_requests_total", endpoint="embed", status="422") == 1
    assert delta(before, after, "embed_requests_total", endpoint="embed", status="401") == 1
    assert delta(before, after, "embed_requests_total", endpoint="batch_embed", status="200") == 1
    assert (
        delta(before, after, "embed_requests_total", endpoint="openai_embeddings", status="200")
        == 1
    )
    assert delta(before, after, "embed_requests_total") == 5
    # Every answered request is timed, refused ones included.
    assert delta(before, after, "embed_request_duration_seconds_count", endpoint="embed") == 3
    assert delta(before, after, "embed_request_duration_seconds_sum") > 0

    assert (
        delta(before, after, "embed_errors_total", endpoint="embed", type="invalid_request_error")
        == 1
    )
    assert (
        delta(before, after, "embed_errors_total", endpoint="embed", type="authentication_error")
        == 1
    )
    assert delta(before, after, "embed_errors_total") == 2

    charged = {
        "embed": one.json()["usage"]["total_tokens"],
        "batch_embed": many.json()["usage"]["total_tokens"],
        "openai_embeddings": oai.json()["usage"]["total_tokens"],
    }
    for endpoint, tokens in charged.items():
        assert delta(before, after, "embed_tokens_total", endpoint=endpoint) == tokens
    logged = UsageLog.objects.filter(tenant=alice.tenant).aggregate(total=Sum("tokens"))["total"]
    assert delta(before, after, "embed_tokens_total") == logged == sum(charged.values())
    assert delta(before, after, "embed_inputs_total", endpoint="batch_embed") == 3
    assert delta(before, after, "embed_inputs_total") == 1 + 3 + 2


def test_it_counts_each_request_in_django_prometheus_series_by_view_status_and_method(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    before = scrape_in_process()
    for _ in range(3):
        assert post(alice, "/embed", {"text": "counted"}).status_code == 200
    assert post(alice, "/batch-embed", {"texts": []}).status_code == 422
    after = scrape_in_process()

    by_view = "django_http_responses_total_by_status_view_method_total"
    assert delta(before, after, by_view, status="200", view="embed", method="POST") == 3
    assert delta(before, after, by_view, status="422", view="batch-embed", method="POST") == 1
    latency = "django_http_requests_latency_seconds_by_view_method_count"
    assert delta(before, after, latency, view="embed", method="POST") == 3
    assert delta(before, after, "django_http_requests_total_by_method_total", method="POST") == 4


def test_it_observes_batches_and_queue_waits(alice: Person, fake_encoder: FakeEncoder) -> None:
    before = scrape_in_process()
    post(alice, "/batch-embed", {"texts": ["one", "two", "three", "four"]})
    post(alice, "/embed", {"text": "five"})
    after = scrape_in_process()
    passes = len(fake_encoder.encoded)
    assert delta(before, after, "embed_batch_size_count") == passes
    assert delta(before, after, "embed_batch_size_sum") == fake_encoder.texts_encoded == 5
    # One observation per request (its first pass), however many passes it needed.
    assert delta(before, after, "embed_queue_wait_seconds_count") == 2
    assert delta(before, after, "embed_queue_wait_seconds_sum") >= 0


def test_it_counts_rate_limited_requests(
    alice: Person, fake_encoder: FakeEncoder, frozen_rate_window: None
) -> None:
    alice.tenant.requests_per_minute = 1
    alice.tenant.save(update_fields=["requests_per_minute"])
    before = scrape_in_process()
    assert post(alice, "/embed", {"text": "first"}).status_code == 200
    second = post(alice, "/embed", {"text": "second"})
    after = scrape_in_process()
    # Served anyway only if the limits could not be checked (they fail open): say so if so.
    cache_failures = delta(before, after, "embed_rate_limit_backend_errors_total")
    assert second.status_code == 429, f"rate-limit cache failures meanwhile: {cache_failures}"
    assert delta(before, after, "embed_rate_limited_total") == 1
    assert delta(before, after, "embed_quota_exceeded_total") == 0
    assert delta(before, after, "embed_errors_total", type="rate_limit_exceeded") == 1
    assert delta(before, after, "embed_requests_total", endpoint="embed", status="429") == 1


def test_it_counts_requests_refused_for_quota(charlie: Person, fake_encoder: FakeEncoder) -> None:
    charlie.tenant.monthly_token_quota = 5
    charlie.tenant.save(update_fields=["monthly_token_quota"])
    before = scrape_in_process()
    assert post(charlie, "/embed", {"text": "fits"}).status_code == 200  # 3 tokens
    assert post(charlie, "/embed", {"text": "does not fit"}).status_code == 429
    after = scrape_in_process()
    assert delta(before, after, "embed_quota_exceeded_total") == 1
    assert delta(before, after, "embed_rate_limited_total") == 0
    assert delta(before, after, "embed_errors_total", type="insufficient_quota") == 1
    assert delta(before, after, "embed_tokens_total") == 3


# --- METRICS_TOKEN ----------------------------------------------------------------------------


def test_it_serves_metrics_without_a_credential_when_no_token_is_configured(
    settings: Any, db: None
) -> None:
    settings.METRICS_TOKEN = ""
    assert "embed_requests_total" in Client().get("/metrics").content.decode()


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Bearer s3cret-metrics-token-", "Basic czNjcmV0", "s3cret"],
    ids=["none", "wrong", "longer", "basic-scheme", "no-scheme"],
)
def test_it_refuses_a_scrape_without_the_metrics_token(
    settings: Any, db: None, authorization: str | None
) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    headers: dict[str, Any] = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = Client().get("/metrics", **headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_metrics_token"
    assert "s3cret" not in response.content.decode()
    assert "embed_requests_total" not in response.content.decode()


def test_it_serves_metrics_with_the_metrics_token(settings: Any, db: None) -> None:
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    scrape = scrape_in_process(HTTP_AUTHORIZATION="Bearer s3cret-metrics-token")
    assert "embed_requests" in scrape.families
    lowercase = Client().get("/metrics", HTTP_AUTHORIZATION="bearer s3cret-metrics-token")
    assert lowercase.status_code == 200


def test_it_answers_other_methods_on_metrics_with_a_json_405(db: None) -> None:
    response = Client().post("/metrics", "{}", content_type="application/json")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_it_keeps_metrics_at_the_path_without_a_slash(db: None) -> None:
    assert Client().get("/metrics/").status_code == 404


# --- Several gunicorn workers -----------------------------------------------------------------


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_adds_up_the_metrics_of_every_gunicorn_worker(alice: Person, tmp_path: Path) -> None:
    alice.tenant.requests_per_minute = 100_000
    alice.tenant.save(update_fields=["requests_per_minute"])
    token = "worker-sum-token"
    service = start_service(
        tmp_path, workers=2, env={"METRICS_TOKEN": token, "MODEL_QUANTIZATION": "fp32"}
    )
    scrape_headers = {"Authorization": f"Bearer {token}"}
    try:
        assert service.get("/metrics").status_code == 401
        paths = [
            ("/embed", lambda i: {"text": f"request number {i}"}),
            ("/batch-embed", lambda i: {"texts": [f"first {i}", f"second of {i}"]}),
            ("/v1/embeddings", lambda i: {"input": f"openai {i}"}),
        ]

        def send(i: int) -> tuple[int, str]:
            path, body = paths[i % len(paths)]
            # A new connection per request, so the kernel spreads them over both workers.
            response = service.post(path, json=body(i), headers=alice.headers)
            return response.status_code, response.headers["x-request-id"]

        sent: list[tuple[int, str]] = []
        # Rounds until both workers have served some, so the sum is really across processes.
        for round_start in range(0, 240, 24):
            with ThreadPoolExecutor(12) as pool:
                sent += list(pool.map(send, range(round_start, round_start + 24)))
            if len(serving_pids(service.log())) == 2:
                break
        assert len(serving_pids(service.log())) == 2, "one worker served every request"
        assert {status for status, _ in sent} == {200}

        scrape = Scrape(service.get("/metrics", headers=scrape_headers).text)
        requests_sent = len(sent)
        assert scrape.value("embed_requests_total") == requests_sent
        assert scrape.value("embed_requests_total", status="200") == requests_sent
        assert scrape.value("embed_request_duration_seconds_count") == requests_sent
        per_endpoint = {
            "embed": len(range(0, requests_sent, 3)),
            "batch_embed": len(range(1, requests_sent, 3)),
            "openai_embeddings": len(range(2, requests_sent, 3)),
        }
        for endpoint, count in per_endpoint.items():
            assert scrape.value("embed_requests_total", endpoint=endpoint) == count, endpoint

        rows = UsageLog.objects.filter(request_id__in=[rid for _, rid in sent])
        totals = rows.aggregate(tokens=Sum("tokens"), inputs=Sum("inputs"))
        assert rows.count() == requests_sent
        assert scrape.value("embed_tokens_total") == totals["tokens"] > 0
        assert scrape.value("embed_inputs_total") == totals["inputs"]
        assert scrape.value("embed_batch_size_sum") == totals["inputs"]

        # Gauges: one series for the served model, however many workers loaded it.
        (info,) = list(scrape.samples("embed_model_info"))
        assert info.labels == {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "dtype": "fp32",
            "dimensions": "384",
        }
        assert info.value == 1
        (load,) = list(scrape.samples("embed_model_load_seconds"))
        assert 0 < load.value < 120
    finally:
        assert service.stop() == 0


def serving_pids(log: str) -> set[int]:
    """Workers that answered an embed request, from the JSON access log."""
    pids = set()
    for line in log.splitlines():
        if line.startswith("{") and '"gunicorn.access"' in line:
            record = json.loads(line)
            if record["path"] in ("/embed", "/batch-embed", "/v1/embeddings"):
                pids.add(record["pid"])
    return pids


def test_it_keeps_labelled_series_for_reuse_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Counter("kept_series", "A counter of this test.", ["method"], registry=None)
    kept_before = len(metrics._children)
    monkeypatch.setattr(metrics, "MAX_KEPT_CHILDREN", kept_before + 2)
    methods = ["GET", "POST", "BREW", "WHEN"]  # a client may send any method
    for method in methods * 2:
        assert metrics.child(counter, method=method) is counter.labels(method=method)
    assert len(metrics._children) == kept_before + 2
