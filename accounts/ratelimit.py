"""Per-tenant requests-per-minute and tokens-per-minute limits in the shared cache (Redis).

Requests are counted with django-ratelimit; tokens use the same fixed windows and cache keys but
add a request's token count instead of one. Both are checked before the model runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import caches
from django_ratelimit.core import _make_cache_key, get_usage
from rest_framework.request import Request

from accounts.models import Tenant
from accounts.selectors import Limits
from embedplatform import metrics
from embedplatform.errors import RateLimitExceeded, ServiceUnavailable

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
EXPIRATION_FUDGE = 5
REQUESTS_GROUP = "embed-requests"
TOKENS_GROUP = "embed-tokens"


@dataclass
class RateLimitState:
    limit_requests: int
    remaining_requests: int
    reset_requests_seconds: int
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining_requests)),
            "x-ratelimit-reset-requests": f"{max(0, self.reset_requests_seconds)}s",
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(max(0, self.remaining_tokens)),
            "x-ratelimit-reset-tokens": f"{max(0, self.reset_tokens_seconds)}s",
        }


def _window_end(key: str) -> int:
    # The same jittered window django-ratelimit uses, so both counters reset together.
    now = int(time.time())
    end = now - (now % WINDOW_SECONDS) + (zlib.crc32(key.encode()) % WINDOW_SECONDS)
    return end + WINDOW_SECONDS if end < now else end


class CacheUnavailable(Exception):
    pass


def _consume_tokens(*, tenant_key: str, limit: int, tokens: int) -> tuple[int, int, bool]:
    """Adds `tokens` to this window's count unless that would pass `limit`.
    Returns (count after, seconds to reset, allowed)."""
    cache = caches[settings.RATELIMIT_USE_CACHE]
    window = _window_end(tenant_key)
    rate = f"{limit}/{WINDOW_SECONDS}s"
    key = _make_cache_key(TOKENS_GROUP, window, rate, tenant_key, None)
    reset = window - int(time.time())
    try:
        if not tokens:
            count = int(cache.get(key, 0))
        else:
            try:
                # One round trip in the common case: the window's counter exists already.
                count = cache.incr(key, tokens)
            except ValueError:  # the window's first request (or its counter just expired)
                if cache.add(key, tokens, WINDOW_SECONDS + EXPIRATION_FUDGE):
                    count = tokens
                else:  # another request created it in between
                    count = cache.incr(key, tokens)
    except Exception as exc:
        raise CacheUnavailable(str(exc)) from exc
    if count > limit and tokens:
        with contextlib.suppress(Exception):  # best effort: the window ends soon anyway
            cache.decr(key, tokens)  # give back what a refused request never used
        return count - tokens, reset, False
    return count, reset, True


def refund_tokens(*, tenant: Tenant, limits: Limits, tokens: int) -> None:
    """Gives back the tokens of a request refused after the rate-limit step (by the quota): it
    was never served, so it must not eat the tenant's per-minute token budget."""
    if tokens <= 0:
        return
    tenant_key = f"tenant:{tenant.pk}"
    rate = f"{limits.tokens_per_minute}/{WINDOW_SECONDS}s"
    key = _make_cache_key(TOKENS_GROUP, _window_end(tenant_key), rate, tenant_key, None)
    with contextlib.suppress(Exception):  # best effort, like the limit itself when Redis is down
        caches[settings.RATELIMIT_USE_CACHE].decr(key, tokens)


def _count_request(*, request: Request, tenant_key: str, limit: int) -> dict[str, int | bool]:
    try:
        usage = get_usage(
            request,
            group=REQUESTS_GROUP,
            key=lambda _group, _request: tenant_key,
            rate=f"{limit}/{WINDOW_SECONDS}s",
            increment=True,
        )
    except Exception as exc:
        raise CacheUnavailable(str(exc)) from exc
    if usage is None or usage.get("time_left", 0) < 0:
        raise CacheUnavailable("the rate-limit cache did not answer")
    return usage


def enforce_rate_limits(
    *, request: Request, tenant: Tenant, limits: Limits, tokens: int
) -> RateLimitState | None:
    """Counts this request and its tokens against the tenant's per-minute limits.

    Raises RateLimitExceeded (429 with Retry-After) when either is spent. When the cache is
    unreachable the request is served (fail-open, the default) or refused with 503 (fail-closed),
    and either way the outage is logged and counted; the state is then None."""
    tenant_key = f"tenant:{tenant.pk}"
    try:
        usage = _count_request(
            request=request, tenant_key=tenant_key, limit=limits.requests_per_minute
        )
        request_count = int(usage["count"])
        reset_requests = int(usage["time_left"])
        if request_count > limits.requests_per_minute:
            token_count, reset_tokens, _ = _consume_tokens(
                tenant_key=tenant_key, limit=limits.tokens_per_minute, tokens=0
            )
            allowed = False
            reason = "requests"
        else:
            token_count, reset_tokens, allowed = _consume_tokens(
                tenant_key=tenant_key, limit=limits.tokens_per_minute, tokens=tokens
            )
            reason = "tokens"
    except CacheUnavailable as exc:
        metrics.RATE_LIMIT_BACKEND_ERRORS.inc()
        fail_open = settings.RATE_LIMIT_FAIL_OPEN
        logger.warning(
            "rate_limit_backend_unavailable",
            extra={"error": str(exc)[:200], "policy": "open" if fail_open else "closed"},
        )
        if fail_open:
            return None
        raise ServiceUnavailable(
            "Rate limiting is unavailable; try again shortly.", code="rate_limit_unavailable"
        ) from exc
    state = RateLimitState(
        limit_requests=limits.requests_per_minute,
        remaining_requests=limits.requests_per_minute - request_count,
        reset_requests_seconds=reset_requests,
        limit_tokens=limits.tokens_per_minute,
        remaining_tokens=limits.tokens_per_minute - token_count,
        reset_tokens_seconds=reset_tokens,
    )
    if not allowed:
        metrics.RATE_LIMITED.inc()
        retry_after = max(1, reset_requests if reason == "requests" else reset_tokens)
        if reason == "requests":
            message = (
                f"Rate limit of {limits.requests_per_minute} requests per minute reached; "
                f"retry in {retry_after} s."
            )
        elif tokens > limits.tokens_per_minute:
            message = (
                f"This request has {tokens} tokens, more than the tenant's limit of "
                f"{limits.tokens_per_minute} tokens per minute; send fewer texts at once."
            )
        else:
            message = (
                f"Rate limit of {limits.tokens_per_minute} tokens per minute reached; "
                f"retry in {retry_after} s."
            )
        raise RateLimitExceeded(
            message,
            code="rate_limit_exceeded",
            headers={**state.headers(), "Retry-After": str(retry_after)},
        )
    return state
