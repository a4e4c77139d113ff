"""Per-tenant requests-per-minute and tokens-per-minute limits in the shared cache (Redis).

Two steps, both before the model runs:

1. `count_request`, right after authentication: the request counts against requests per minute
   (with django-ratelimit), whatever becomes of it later, so that even a stream of invalid
   requests meets the limit; from here on every response carries the x-ratelimit-* headers.
2. `consume_tokens`, once the texts are tokenized: their tokens count against tokens per minute,
   in the same fixed windows, by adding the token count instead of one.

A request refused after step 2 (quota, a failed model) gets its tokens back with `refund_tokens`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import caches
from django_ratelimit.core import _get_window, _make_cache_key, get_usage
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


class CacheUnavailable(Exception):
    pass


@dataclass
class RateLimitState:
    """Where a request stands against its tenant's limits, and what it has consumed."""

    limit_requests: int
    remaining_requests: int
    reset_requests_seconds: int
    limit_tokens: int
    # None until known: the served path learns it from its own charge (`consume_tokens`), so
    # only a request refused before that reads the counter (`with_remaining_tokens`).
    remaining_tokens: int | None
    reset_tokens_seconds: int
    # The token window this request charged, and how much, so a refund hits exactly that.
    tokens_key: str
    tokens_charged: int = 0

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining_requests)),
            "x-ratelimit-reset-requests": f"{max(0, self.reset_requests_seconds)}s",
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(max(0, self.remaining_tokens or 0)),  # set by now
            "x-ratelimit-reset-tokens": f"{max(0, self.reset_tokens_seconds)}s",
        }


def _tenant_key(tenant: Tenant) -> str:
    return f"tenant:{tenant.pk}"


def _tokens_key(tenant_key: str, limit: int) -> tuple[str, int]:
    """The cache key of the current tokens window and the seconds until it resets: the jittered
    window django-ratelimit gives the requests counter, so both reset together."""
    window = _get_window(tenant_key, WINDOW_SECONDS)
    rate = f"{limit}/{WINDOW_SECONDS}s"
    return _make_cache_key(TOKENS_GROUP, window, rate, tenant_key, None), window - int(time.time())


def _tokens_used(key: str) -> int:
    try:
        return int(caches[settings.RATELIMIT_USE_CACHE].get(key, 0))
    except Exception as exc:
        raise CacheUnavailable(str(exc)) from exc


def _add_tokens(key: str, tokens: int) -> int:
    """Adds `tokens` to a window's counter; the count after."""
    cache = caches[settings.RATELIMIT_USE_CACHE]
    try:
        try:
            # One round trip in the common case: the window's counter exists already.
            return int(cache.incr(key, tokens))
        except ValueError:  # the window's first request (or its counter just expired)
            if cache.add(key, tokens, WINDOW_SECONDS + EXPIRATION_FUDGE):
                return tokens
            return int(cache.incr(key, tokens))  # another request created it in between
    except Exception as exc:
        raise CacheUnavailable(str(exc)) from exc


def _take_back(key: str, tokens: int) -> None:
    """Subtracts from a window's counter; a window that has expired meanwhile is left alone."""
    with contextlib.suppress(Exception):  # best effort: the window ends within a minute anyway
        caches[settings.RATELIMIT_USE_CACHE].decr(key, tokens)


def _backend_failed(exc: CacheUnavailable) -> None:
    """Counts and logs a cache outage, then serves (fail-open) or refuses (fail-closed)."""
    metrics.RATE_LIMIT_BACKEND_ERRORS.inc()
    fail_open = settings.RATE_LIMIT_FAIL_OPEN
    logger.warning(
        "rate_limit_backend_unavailable",
        extra={"error": str(exc)[:200], "policy": "open" if fail_open else "closed"},
    )
    if not fail_open:
        raise ServiceUnavailable(
            "Rate limiting is unavailable; try again shortly.", code="rate_limit_unavailable"
        ) from exc


def _refuse(state: RateLimitState, message: str, retry_after: int) -> RateLimitExceeded:
    metrics.RATE_LIMITED.inc()
    retry_after = max(1, retry_after)
    return RateLimitExceeded(
        message.format(retry_after=retry_after),
        code="rate_limit_exceeded",
        headers={**state.headers(), "Retry-After": str(retry_after)},
    )


def count_request(*, request: Request, tenant: Tenant, limits: Limits) -> RateLimitState | None:
    """Step 1: counts this request against the tenant's requests per minute.

    Raises RateLimitExceeded (429 with Retry-After) when the minute's requests are spent. When
    the cache is unreachable the outage is counted and logged, and the request goes on without
    limits (None) or is refused with 503, as RATE_LIMIT_FAIL_OPEN says."""
    tenant_key = _tenant_key(tenant)
    try:
        try:
            usage = get_usage(
                request,
                group=REQUESTS_GROUP,
                key=lambda _group, _request: tenant_key,
                rate=f"{limits.requests_per_minute}/{WINDOW_SECONDS}s",
                increment=True,
            )
        except Exception as exc:
            raise CacheUnavailable(str(exc)) from exc
        if usage is None or usage.get("time_left", 0) < 0:
            raise CacheUnavailable("the rate-limit cache did not answer")
        tokens_key, reset_tokens = _tokens_key(tenant_key, limits.tokens_per_minute)
    except CacheUnavailable as exc:
        _backend_failed(exc)
        return None
    state = RateLimitState(
        limit_requests=limits.requests_per_minute,
        remaining_requests=limits.requests_per_minute - int(usage["count"]),
        reset_requests_seconds=int(usage["time_left"]),
        limit_tokens=limits.tokens_per_minute,
        remaining_tokens=None,
        reset_tokens_seconds=reset_tokens,
        tokens_key=tokens_key,
    )
    if int(usage["count"]) > limits.requests_per_minute:
        raise _refuse(
            with_remaining_tokens(state),
            f"Rate limit of {limits.requests_per_minute} requests per minute reached; "
            "retry in {retry_after} s.",
            state.reset_requests_seconds,
        )
    return state


def with_remaining_tokens(state: RateLimitState) -> RateLimitState:
    """Fills in the tokens left this minute, for a response that did not charge any."""
    if state.remaining_tokens is None:
        try:
            state.remaining_tokens = state.limit_tokens - _tokens_used(state.tokens_key)
        except CacheUnavailable:
            state.remaining_tokens = state.limit_tokens  # unknown: the headers claim no use
    return state


def consume_tokens(*, state: RateLimitState | None, tokens: int) -> None:
    """Step 2: counts the request's tokens against the tenant's tokens per minute, unless that
    would pass the limit (429, nothing counted). No state means step 1 found the cache down."""
    if state is None or tokens <= 0:
        return
    try:
        used = _add_tokens(state.tokens_key, tokens)
    except CacheUnavailable as exc:
        _backend_failed(exc)
        return
    if used > state.limit_tokens:
        _take_back(state.tokens_key, tokens)  # nothing of a refused request counts
        state.remaining_tokens = state.limit_tokens - (used - tokens)
        if tokens > state.limit_tokens:
            message = (
                f"This request has {tokens} tokens, more than the tenant's limit of "
                f"{state.limit_tokens} tokens per minute; send fewer texts at once."
            )
        else:
            message = (
                f"Rate limit of {state.limit_tokens} tokens per minute reached; "
                "retry in {retry_after} s."
            )
        raise _refuse(state, message, state.reset_tokens_seconds)
    state.tokens_charged = tokens
    state.remaining_tokens = state.limit_tokens - used


def refund_tokens(*, state: RateLimitState | None) -> None:
    """Gives back the tokens of a request refused after step 2 (its quota, a failed model):
    it was never served, so it must not eat the minute's token budget."""
    if state is None or not state.tokens_charged:
        return
    _take_back(state.tokens_key, state.tokens_charged)
    if state.remaining_tokens is not None:
        state.remaining_tokens += state.tokens_charged
    state.tokens_charged = 0
