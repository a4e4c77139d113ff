"""Per-tenant requests-per-minute and tokens-per-minute limits, counted in Redis.

Every embed response past the rate-limit step carries the x-ratelimit-* headers; a limited
request gets 429 `rate_limit_exceeded` with Retry-After and costs no model work. When Redis is
unreachable the service serves anyway (fail-open, the default) or refuses with 503
(fail-closed), never hangs, and logs and counts the outage.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from prometheus_client import REGISTRY

from accounts.models import Plan, QuotaPeriod, Tenant, UsageLog
from accounts.selectors import current_period_start
from tests.conftest import FakeEncoder, Person
from tests.helpers import assert_error, embed
from tests.service import ROOT, free_port

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen_rate_window")]

REQUEST_HEADERS = ("limit-requests", "remaining-requests", "reset-requests")
TOKEN_HEADERS = ("limit-tokens", "remaining-tokens", "reset-tokens")
ALL_HEADERS = [f"x-ratelimit-{name}" for name in (*REQUEST_HEADERS, *TOKEN_HEADERS)]


def limit(tenant: Tenant, *, requests: int | None = None, tokens: int | None = None) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(
        requests_per_minute=requests, tokens_per_minute=tokens
    )


def seconds(value: str) -> int:
    assert value.endswith("s"), value
    return int(value[:-1])


def test_it_sends_the_rate_limit_headers_with_every_response(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    limit(alice.tenant, requests=5, tokens=100)
    first, second = embed(alice), embed(alice)
    assert first.status_code == second.status_code == 200
    assert first["x-ratelimit-limit-requests"] == "5"
    assert first["x-ratelimit-remaining-requests"] == "4"
    assert second["x-ratelimit-remaining-requests"] == "3"
    assert first["x-ratelimit-limit-tokens"] == "100"
    assert first["x-ratelimit-remaining-tokens"] == "96"
    assert second["x-ratelimit-remaining-tokens"] == "92"
    for response in (first, second):
        assert 0 <= seconds(response["x-ratelimit-reset-requests"]) <= 60
        assert 0 <= seconds(response["x-ratelimit-reset-tokens"]) <= 60


def test_it_takes_the_default_plans_requests_per_minute_from_the_setting(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.RATE_LIMIT_PER_MIN = 7
    assert alice.tenant.plan.requests_per_minute is None
    assert embed(alice)["x-ratelimit-limit-requests"] == "7"


def test_it_refuses_the_request_past_the_per_minute_limit_without_model_work(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    limit(alice.tenant, requests=2, tokens=1000)
    assert embed(alice).status_code == embed(alice).status_code == 200

    refused = embed(alice)

    error = assert_error(refused, 429, error_type="rate_limit_exceeded", code="rate_limit_exceeded")
    assert "2 requests per minute" in error["message"]
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert set(ALL_HEADERS) <= {name.lower() for name in refused.headers}
    assert fake_encoder.texts_encoded == 2
    row = UsageLog.objects.get(status_code=429)
    assert (row.tokens, row.error_type, row.tenant) == (0, "rate_limit_exceeded", alice.tenant)
    assert QuotaPeriod.objects.get(tenant=alice.tenant).tokens == 8


def test_it_limits_tokens_per_minute(alice: Person, fake_encoder: FakeEncoder) -> None:
    limit(alice.tenant, requests=100, tokens=10)
    assert embed(alice).status_code == 200  # 4 of 10
    assert embed(alice).status_code == 200  # 8 of 10

    refused = embed(alice)  # 12 would pass 10

    error = assert_error(refused, 429, code="rate_limit_exceeded")
    assert "10 tokens per minute" in error["message"]
    assert refused["x-ratelimit-remaining-tokens"] == "2"
    assert int(refused["Retry-After"]) >= 1
    assert fake_encoder.texts_encoded == 2
    # A request that can never fit says so, rather than "retry".
    too_big = embed(alice, " ".join(["word"] * 20))
    assert "send fewer texts" in assert_error(too_big, 429, code="rate_limit_exceeded")["message"]
    assert fake_encoder.texts_encoded == 2


def test_it_adds_tokens_to_the_window_in_one_round_trip_with_no_script() -> None:
    from django.core.cache import cache
    from django_redis import get_redis_connection

    from accounts import ratelimit

    redis = get_redis_connection("default")
    key = f"{ratelimit.TOKENS_KEY_PREFIX}:spec:{time.time_ns()}"
    before = redis.info("commandstats")
    assert ratelimit._add_tokens(key, 3) == 3
    assert ratelimit._add_tokens(key, 4) == 7
    after = redis.info("commandstats")

    def calls(command: str) -> int:
        name = f"cmdstat_{command}"
        return int(after.get(name, {}).get("calls", 0)) - int(before.get(name, {}).get("calls", 0))

    assert (calls("set"), calls("incrby"), calls("eval"), calls("evalsha")) == (2, 2, 0, 0)
    # The counter the headers read (cache.get) and refunds change (cache.decr), expiring with
    # the window.
    assert cache.get(key) == 7
    cache.decr(key, 7)
    assert cache.get(key) == 0
    assert (
        0 < redis.ttl(cache.make_key(key)) <= ratelimit.WINDOW_SECONDS + ratelimit.EXPIRATION_FUDGE
    )


def test_it_writes_the_counter_commands_byte_for_byte_as_redis_py_would() -> None:
    from redis.connection import Connection

    from accounts.ratelimit_cache import _counter_commands

    for key, amount, timeout in [("rl:tenant:7:1700000000", 1, 65), ("rl:é:x", 123_456, 3600)]:
        expected = Connection().pack_commands(
            [("SET", key, 0, "EX", timeout, "NX"), ("INCRBY", key, amount)]
        )
        assert _counter_commands(key.encode(), amount, timeout) == b"".join(expected)


def test_it_raises_redis_errors_on_a_counter_and_counts_on_a_fresh_connection_after() -> None:
    from django_redis import get_redis_connection
    from redis.exceptions import ResponseError

    from accounts.ratelimit_cache import add_to_counter

    redis = get_redis_connection("ratelimit")
    key = f"spec:not-a-number:{time.time_ns()}"
    redis.set(key, "abc", ex=60)
    with pytest.raises(ResponseError, match="not an integer"):
        add_to_counter(redis, key, 2, timeout=60)
    redis.delete(key)
    assert add_to_counter(redis, key, 2, timeout=60) == 2
    assert add_to_counter(redis, key, 3, timeout=60) == 5
    assert 0 < redis.ttl(key) <= 60


def test_it_counts_over_resp2_on_its_kept_connection_whatever_the_pool_speaks() -> None:
    # RESP3 (redis-py's default here) may send push frames between replies; RESP2 never does.
    from django_redis import get_redis_connection

    from accounts.ratelimit_cache import _connection_of, add_to_counter

    redis = get_redis_connection("ratelimit")
    key = f"spec:resp2:{time.time_ns()}"
    assert add_to_counter(redis, key, 4, timeout=60) == 4
    kept = _connection_of(redis)
    assert str(kept.protocol) == "2"
    assert kept.exchange_lines.__self__ is kept  # the reader of our connection class
    assert add_to_counter(redis, key, 1, timeout=60) == 5


def test_it_speaks_tls_to_a_rediss_url_and_plain_tcp_to_a_redis_one() -> None:
    from redis import ConnectionPool
    from redis.connection import SSLConnection

    from embedplatform.fault_state import FailFastRedisConnection, connection_class_for

    for url, tls in [("rediss://cache.example:6380/0", True), ("redis://127.0.0.1:6379/0", False)]:
        pool = ConnectionPool.from_url(url, connection_class=connection_class_for(url))
        assert issubclass(pool.connection_class, FailFastRedisConnection)
        assert issubclass(pool.connection_class, SSLConnection) is tls


def count_requests(tenant_id: int, times: int = 1) -> list[int]:
    """Counts requests of `tenant_id` against a wide requests-per-minute window; the counts."""
    from django.test import RequestFactory
    from rest_framework.request import Request

    from accounts import ratelimit
    from accounts.selectors import Limits

    limits = Limits(
        requests_per_minute=10_000,
        tokens_per_minute=10_000,
        monthly_token_quota=10_000,
        max_texts_per_request=8,
        max_openai_inputs_per_request=8,
    )
    request = Request(RequestFactory().post("/embed"))
    counts = []
    for _ in range(times):
        state = ratelimit.count_request(request=request, tenant_id=tenant_id, limits=limits)
        assert state is not None
        counts.append(limits.requests_per_minute - state.remaining_requests)
    return counts


@pytest.fixture
def redis_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the Redis round trips from here on (a pipeline is one)."""
    from embedplatform.fault_state import FailFastRedisConnection

    sent = [0]
    for name in ("send_packed_command", "exchange_lines"):
        send = getattr(FailFastRedisConnection, name)

        def counting(self: Any, *args: Any, _send: Any = send, **kwargs: Any) -> Any:
            sent[0] += 1
            return _send(self, *args, **kwargs)

        monkeypatch.setattr(FailFastRedisConnection, name, counting)
    return sent


def test_it_counts_a_request_in_one_redis_round_trip(redis_round_trips: list[int]) -> None:
    tenant_id = time.time_ns()  # a window no other test has seen
    for expected in (1, 2, 3):
        before = redis_round_trips[0]
        assert count_requests(tenant_id) == [expected]
        assert redis_round_trips[0] - before == 1


def test_it_counts_a_query_and_its_tokens_in_one_redis_round_trip(
    alice: Person, fake_encoder: FakeEncoder, redis_round_trips: list[int]
) -> None:
    limit(alice.tenant, requests=100, tokens=1000)
    assert embed(alice).status_code == 200  # the window's first request makes its counters
    before = redis_round_trips[0]

    served = embed(alice)

    assert served.status_code == 200
    assert redis_round_trips[0] - before == 1
    assert served["x-ratelimit-remaining-requests"] == "98"
    assert served["x-ratelimit-remaining-tokens"] == "992"


def test_it_gives_back_the_tokens_of_a_request_past_the_requests_limit(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    limit(alice.tenant, requests=2, tokens=1000)
    assert embed(alice).status_code == embed(alice).status_code == 200

    refused = embed(alice)  # counted with its tokens, which are then taken back

    assert_error(refused, 429, code="rate_limit_exceeded")
    assert refused["x-ratelimit-remaining-tokens"] == "992"
    assert embed(alice)["x-ratelimit-remaining-tokens"] == "992"
    assert fake_encoder.texts_encoded == 2


@pytest.fixture
def tokenized_texts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts tokenized from here on."""
    from embeddings.runtime import Runtime

    seen: list[str] = []
    tokenize = Runtime.tokenize

    def recording(self: Runtime, texts: list[str], **kwargs: Any) -> Any:
        seen.extend(texts)
        return tokenize(self, texts, **kwargs)

    monkeypatch.setattr(Runtime, "tokenize", recording)
    return seen


def test_it_refuses_a_tenant_known_past_its_limit_before_any_work_on_its_body(
    alice: Person, fake_encoder: FakeEncoder, tokenized_texts: list[str]
) -> None:
    limit(alice.tenant, requests=1)
    assert embed(alice, "first").status_code == 200
    assert embed(alice, "second").status_code == 429  # counted with its tokens: tokenized

    assert_error(embed(alice, "third"), 429, code="rate_limit_exceeded")

    assert tokenized_texts == ["first", "second"]
    assert UsageLog.objects.filter(status_code=429).count() == 2


def test_it_counts_a_large_request_on_arrival_before_any_work_on_its_body(
    alice: Person, fake_encoder: FakeEncoder, tokenized_texts: list[str]
) -> None:
    from accounts.metering.meter import COUNT_WITH_TOKENS_MAX_BODY

    limit(alice.tenant, requests=1)
    assert embed(alice, "first").status_code == 200
    large = "word " * (COUNT_WITH_TOKENS_MAX_BODY // 5)

    assert_error(embed(alice, large), 429, code="rate_limit_exceeded")

    assert tokenized_texts == ["first"]


def test_it_answers_an_invalid_request_past_the_limit_with_429(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    limit(alice.tenant, requests=1)
    assert embed(alice).status_code == 200

    refused = Client().post(
        "/embed", {"text": ""}, content_type="application/json", **alice.client_headers
    )

    assert_error(refused, 429, code="rate_limit_exceeded")
    assert set(ALL_HEADERS) <= {name.lower() for name in refused.headers}
    row = UsageLog.objects.get(status_code=429)
    assert (row.tokens, row.error_type) == (0, "rate_limit_exceeded")


def test_it_counts_from_one_again_when_a_windows_counter_is_lost() -> None:
    from django.core.cache import caches
    from django_redis import get_redis_connection

    from accounts import ratelimit

    redis = get_redis_connection("ratelimit")
    prefix = caches["ratelimit"].make_key("")
    before = set(redis.keys(f"{prefix}*"))
    tenant_id = time.time_ns()
    assert count_requests(tenant_id, times=2) == [1, 2]
    (window_key,) = set(redis.keys(f"{prefix}*")) - before
    redis.delete(window_key)  # as a Redis restart or an eviction would

    assert count_requests(tenant_id, times=2) == [1, 2]
    assert 0 < redis.ttl(window_key) <= ratelimit.WINDOW_SECONDS + ratelimit.EXPIRATION_FUDGE


def test_it_counts_on_after_redis_hung_in_the_middle_of_a_count() -> None:
    from urllib.parse import urlsplit

    import redis
    from django.conf import settings

    from accounts.ratelimit_cache import add_to_counter
    from tests.tcp_proxy import TcpProxy

    upstream = urlsplit(settings.REDIS_URL)
    proxy = TcpProxy((upstream.hostname or "127.0.0.1", upstream.port or 6379))
    try:
        client = redis.Redis(
            host="127.0.0.1",
            port=proxy.port,
            db=int(upstream.path.strip("/") or 0),
            socket_timeout=0.25,
        )
        key = f"spec:counter:{time.time_ns()}"
        assert [add_to_counter(client, key, 1, timeout=60) for _ in range(2)] == [1, 2]
        proxy.set("hang")
        with pytest.raises(redis.exceptions.TimeoutError):
            add_to_counter(client, key, 1, timeout=60)
        proxy.set("forward")
        # A new connection: no late reply of the hung count is ever read as this count's.
        assert add_to_counter(client, key, 5, timeout=60) == 7
        assert 0 < client.ttl(key) <= 60
        client.delete(key)
    finally:
        proxy.close()


def test_it_counts_on_when_redis_closed_the_kept_connection_while_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django.core.cache import caches
    from django_redis import get_redis_connection

    from accounts import ratelimit_cache

    monkeypatch.setattr(ratelimit_cache, "IDLE_CHECK_SECONDS", 0.0)
    redis = get_redis_connection("ratelimit")
    key = caches["ratelimit"].make_key(f"spec:idle:{time.time_ns()}")
    assert ratelimit_cache.add_to_counter(redis, key, 1, timeout=60) == 1
    host, port = ratelimit_cache._kept.connection._sock.getsockname()[:2]
    assert redis.client_kill(f"{host}:{port}")  # as Redis' idle `timeout` or a proxy would

    assert ratelimit_cache.add_to_counter(redis, key, 1, timeout=60) == 2
    redis.delete(key)


def test_it_counts_concurrent_requests_exactly_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    tenant_id = time.time_ns()

    def client(_: int) -> list[int]:
        try:
            return count_requests(tenant_id, times=25)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(8) as pool:
        counts = [count for counts in pool.map(client, range(8)) for count in counts]
    assert sorted(counts) == list(range(1, 201))


def test_it_counts_each_tenant_on_its_own(
    alice: Person, bob: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    limit(alice.tenant, requests=1)
    assert embed(alice).status_code == 200
    # bob acts for alice's team, so he shares its minute; charlie does not.
    assert_error(embed(bob), 429, code="rate_limit_exceeded")
    response = embed(charlie)
    assert response.status_code == 200
    assert response["x-ratelimit-remaining-requests"] == str(
        int(response["x-ratelimit-limit-requests"]) - 1
    )


def test_it_sends_the_headers_on_a_quota_refusal_too(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    Tenant.objects.filter(pk=alice.tenant.pk).update(monthly_token_quota=3)
    refused = embed(alice)
    assert_error(refused, 429, error_type="insufficient_quota")
    assert set(ALL_HEADERS) <= {name.lower() for name in refused.headers}
    assert "Retry-After" not in refused


def test_it_counts_a_shared_plans_limit_for_each_tenant_apart(
    alice: Person, charlie: Person, fake_encoder: FakeEncoder
) -> None:
    plan = Plan.objects.create(name="tiny", requests_per_minute=1)
    Tenant.objects.filter(pk__in=[alice.tenant.pk, charlie.tenant.pk]).update(plan=plan)
    assert embed(alice).status_code == 200
    assert embed(charlie).status_code == 200
    assert_error(embed(alice), 429, code="rate_limit_exceeded")


# --- Redis unreachable --------------------------------------------------------------------------


@pytest.fixture(params=["refused", "silent"])
def dead_redis(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """The cache pointed at a Redis that refuses connections, or at one that accepts them and
    never answers (the case that hangs a service without socket timeouts)."""
    listener = None
    if request.param == "refused":
        port = free_port()
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
    dead = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{port}/0",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SOCKET_CONNECT_TIMEOUT": settings.REDIS_SOCKET_TIMEOUT,
            "SOCKET_TIMEOUT": settings.REDIS_SOCKET_TIMEOUT,
            "CONNECTION_POOL_KWARGS": {"retry_on_timeout": False},
        },
    }
    settings.CACHES = {
        "default": dead,
        "ratelimit": {**dead, "BACKEND": "accounts.ratelimit_cache.RateLimitCache"},
    }
    yield request.param
    if listener is not None:
        listener.close()


def backend_errors() -> float:
    return REGISTRY.get_sample_value("embed_rate_limit_backend_errors_total") or 0.0


def outage_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "rate_limit_backend_unavailable"]


def test_it_serves_when_redis_is_unreachable_by_default(
    alice: Person, fake_encoder: FakeEncoder, dead_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    errors_before = backend_errors()
    started = time.monotonic()
    response = embed(alice)
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.content
    assert elapsed < 1.5
    assert "x-ratelimit-limit-requests" not in response
    assert fake_encoder.texts_encoded == 1
    assert backend_errors() == errors_before + 1
    (record,) = outage_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.policy == "open"  # type: ignore[attr-defined]  # set through logging's extra=
    assert UsageLog.objects.get().tokens == 4


def test_it_refuses_with_503_when_redis_is_unreachable_and_failing_closed(
    alice: Person,
    fake_encoder: FakeEncoder,
    dead_redis: str,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.RATE_LIMIT_FAIL_OPEN = False
    errors_before = backend_errors()
    started = time.monotonic()
    response = embed(alice)
    elapsed = time.monotonic() - started

    assert_error(response, 503, error_type="service_unavailable", code="rate_limit_unavailable")
    assert elapsed < 1.5
    assert fake_encoder.texts_encoded == 0
    assert backend_errors() == errors_before + 1
    (record,) = outage_records(caplog)
    assert record.policy == "closed"  # type: ignore[attr-defined]  # set through logging's extra=
    row = UsageLog.objects.get()
    assert (row.status_code, row.tokens, row.error_type) == (503, 0, "service_unavailable")
    assert not QuotaPeriod.objects.filter(
        tenant=alice.tenant, period_start=current_period_start(), tokens__gt=0
    ).exists()


def start_log(**env: str) -> str:
    """What the service logs at start (a serving process's app setup, without the model)."""
    full_env = {
        **os.environ,
        "EMBEDPLATFORM_SERVING": "1",
        "MODEL_LOAD_ON_START": "false",
        **env,
    }
    full_env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_it_says_at_start_when_rate_limits_are_counted_per_process(tmp_path: Any) -> None:
    sqlite = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    assert "rate_limits_use_local_cache" in start_log(REDIS_URL="", DATABASE_URL=sqlite)
    assert "rate_limits_use_local_cache" not in start_log(
        REDIS_URL="redis://127.0.0.1:6379/0", DATABASE_URL=sqlite
    )


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/embed", {"text": ""}, 422),
        ("/batch-embed", {"texts": ["a"] * 300}, 413),
        ("/v1/embeddings", {"input": "a", "model": "no-such-model"}, 404),
    ],
)
def test_it_sends_the_headers_with_refusals_after_authentication_too(
    alice: Person, fake_encoder: FakeEncoder, path: str, body: dict[str, Any], status: int
) -> None:
    response = Client().post(path, body, content_type="application/json", **alice.client_headers)
    assert response.status_code == status
    for name in REQUEST_HEADERS + TOKEN_HEADERS:
        assert f"x-ratelimit-{name}" in response, name


def test_it_counts_invalid_requests_against_requests_per_minute(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    limit(alice.tenant, requests=2)
    for _ in range(2):
        bad = Client().post(
            "/embed", {"text": ""}, content_type="application/json", **alice.client_headers
        )
        assert bad.status_code == 422
    assert_error(embed(alice), 429, code="rate_limit_exceeded")


def test_it_gives_back_the_tokens_of_a_request_the_model_failed(
    alice: Person, fake_encoder: FakeEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embeddings import runtime

    limit(alice.tenant, requests=100, tokens=100)

    def explode(texts: list[str], prompt: str) -> Any:
        raise RuntimeError("model failed")

    monkeypatch.setattr(fake_encoder, "encode", explode)
    runtime.install_runtime(fake_encoder)
    assert embed(alice).status_code == 500
    monkeypatch.undo()
    runtime.install_runtime(fake_encoder)
    served = embed(alice)
    assert served.status_code == 200
    assert served["x-ratelimit-remaining-tokens"] == "96"  # only the served request's 4


# --- Timing -------------------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand, for django-ratelimit and our windows alike."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(frozen_rate_window: None, monkeypatch: pytest.MonkeyPatch) -> Clock:
    import django_ratelimit.core

    import accounts.ratelimit

    clock = Clock(time.time())
    monkeypatch.setattr(accounts.ratelimit, "time", clock)
    monkeypatch.setattr(django_ratelimit.core, "time", clock)
    return clock


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.999])
@pytest.mark.parametrize("step", ["requests", "tokens"])
def test_it_says_exactly_when_a_refused_request_would_be_served(
    alice: Person, fake_encoder: FakeEncoder, clock: Clock, fraction: float, step: str
) -> None:
    """Retry-After (rounded up) and x-ratelimit-reset-* are never early: waiting exactly that
    long is served, and a millisecond less is not (for retry-after-ms) or, for whole seconds,
    a second less is not."""
    from accounts.ratelimit import window_end

    # Anywhere inside a second: the real end of the window is not on the second of the header.
    clock.now = float(int(clock.now)) + fraction
    limit(alice.tenant, requests=1 if step == "requests" else 100, tokens=4)
    assert embed(alice).status_code == 200
    refused = embed(alice)
    assert_error(refused, 429, code="rate_limit_exceeded")
    retry_after = int(refused["Retry-After"])
    retry_after_ms = int(refused["retry-after-ms"])
    assert 1 <= retry_after <= 60
    assert seconds(refused["x-ratelimit-reset-requests"]) == retry_after
    assert seconds(refused["x-ratelimit-reset-tokens"]) == retry_after
    assert retry_after_ms <= retry_after * 1000
    # The window really ends at the start of the second after its end second.
    assert window_end(f"tenant:{alice.tenant.pk}", now=clock.now) + 1 - clock.now == pytest.approx(
        retry_after_ms / 1000, abs=0.0011
    )
    started = clock.now
    clock.now = started + retry_after_ms / 1000 - 0.002
    assert_error(embed(alice), 429, code="rate_limit_exceeded")
    clock.now = started + retry_after - 1
    assert_error(embed(alice), 429, code="rate_limit_exceeded")
    clock.now = started + retry_after_ms / 1000
    assert embed(alice).status_code == 200
    clock.now = started + retry_after  # any client waiting the whole seconds, too
    limit(alice.tenant, requests=100, tokens=8)
    assert embed(alice).status_code == 200


def test_it_counts_tokens_in_the_window_their_request_was_counted_in_across_its_end(
    alice: Person, fake_encoder: FakeEncoder, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.cache import caches

    from accounts import ratelimit

    limit(alice.tenant, requests=100, tokens=10)
    tenant_key = f"tenant:{alice.tenant.pk}"
    end = ratelimit.window_end(tenant_key, now=clock.now)
    clock.now = end + 1.2  # the next window: its counters exist from here on
    assert embed(alice)["x-ratelimit-remaining-tokens"] == "6"
    clock.now = end + 0.5  # the last second of the window ending at `end`
    assert embed(alice)["x-ratelimit-remaining-tokens"] == "6"
    assert embed(alice)["x-ratelimit-remaining-tokens"] == "2"
    counted = ratelimit._requests_used

    def straddling(*args: Any, **kwargs: Any) -> int:
        clock.now = end + 1.2  # the request is counted once the next window has begun
        return int(counted(*args, **kwargs))

    monkeypatch.setattr(ratelimit, "_requests_used", straddling)

    served = embed(alice)  # 4 more tokens: too many for the old window, room in the new one

    assert served.status_code == 200
    assert served["x-ratelimit-remaining-tokens"] == "2"
    old_window = f"{ratelimit.TOKENS_KEY_PREFIX}:{tenant_key}:10:{end}"
    assert caches["ratelimit"].get(old_window) == 8


def test_it_gives_back_tokens_that_rode_on_a_count_redis_answered_wrongly(
    alice: Person, fake_encoder: FakeEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django_ratelimit.core

    limit(alice.tenant, requests=100, tokens=100)
    assert embed(alice)["x-ratelimit-remaining-tokens"] == "96"
    get_usage = django_ratelimit.core.get_usage

    def past_its_window(*args: Any, **kwargs: Any) -> Any:
        return {**get_usage(*args, **kwargs), "time_left": -1}  # the window ended meanwhile

    with monkeypatch.context() as patched:
        patched.setattr("accounts.ratelimit.get_usage", past_its_window)
        assert embed(alice).status_code == 200  # served without limits (fail-open)

    assert embed(alice)["x-ratelimit-remaining-tokens"] == "92"  # the unlimited one's given back
