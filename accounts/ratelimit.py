"""Per-tenant requests-per-minute and tokens-per-minute windows in the shared cache (Redis).

Two counts, both before the model runs:

1. `count_request`, right after authentication: the request counts against requests per minute
   (django-ratelimit's public `get_usage`), whatever becomes of it later, so that even a stream
   of invalid requests meets the limit; from here on every response carries the x-ratelimit-*
   headers.
2. `consume_tokens`, once the texts are tokenized: their tokens count against tokens per minute
   in a window that ends when the requests window does (one INCRBY in the common case).

`count_request_with_tokens` does both at once, in one Redis round trip, for a small request the
meter left uncounted until its tokens were known (accounts/metering/meter.py: `Meter.admit`).

A request refused after step 2 (quota, a failed model) gets its tokens back (`refund_tokens`).

Timing is never early. django-ratelimit's window named by its end second `w` still counts
requests made during second `w` itself, so it really ends at `w + 1`; Retry-After and the reset
headers are the seconds until then, rounded up, so a client that waits exactly that long is
served (the openai client's first retry, for one).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import caches
from django_ratelimit.core import get_usage
from rest_framework.request import Request

from accounts.ratelimit_cache import add_to_counter, redis_of, riding
from accounts.selectors import Limits
from embedplatform import metrics
from embedplatform.errors import RateLimitExceeded, ServiceUnavailable

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
EXPIRATION_FUDGE = 5
REQUESTS_GROUP = "embed-requests"
TOKENS_KEY_PREFIX = "rl:embed-tokens"


class CacheUnavailable(Exception):
    pass


@dataclass
class RateLimitState:
    """Where a request stands against its tenant's limits, and what it has consumed."""

    limit_requests: int
    remaining_requests: int
    limit_tokens: int
    # None until known: the served path learns it from its own charge (`consume_tokens`), so
    # only a request refused before that reads the counter (`with_remaining_tokens`).
    remaining_tokens: int | None
    # The second (epoch) the current windows end in; they end for real a second later.
    window_end: int
    # The token window this request charged, and how much, so a refund hits exactly that.
    tokens_key: str
    tokens_charged: int = 0

    def seconds_to_reset(self) -> int:
        """Whole seconds until the next window begins, rounded up: never early."""
        return max(1, math.ceil(self.window_end + 1 - time.time()))

    def headers(self) -> dict[str, str]:
        reset = f"{self.seconds_to_reset()}s"
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining_requests)),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(max(0, self.remaining_tokens or 0)),  # set by now
            "x-ratelimit-reset-tokens": reset,
        }


def window_end(value: str, *, now: float | None = None) -> int:
    """The end second of the current window for `value`, as django-ratelimit places it: fixed
    windows, each key's shifted by a jitter of its own so that not every tenant resets at once."""
    ts = int(time.time() if now is None else now)
    end = ts - ts % WINDOW_SECONDS + zlib.crc32(value.encode()) % WINDOW_SECONDS
    return end + WINDOW_SECONDS if end < ts else end


def _tokens_used(key: str) -> int:
    try:
        return int(caches[settings.RATELIMIT_USE_CACHE].get(key, 0))
    except Exception as exc:
        raise CacheUnavailable(str(exc)) from exc


def _add_tokens(key: str, tokens: int) -> int:
    """Adds `tokens` to a window's counter; the count after."""
    cache = caches[settings.RATELIMIT_USE_CACHE]
    try:
        redis = redis_of(cache)
        if redis is not None:
            return add_to_counter(
                redis, cache.make_key(key), tokens, timeout=WINDOW_SECONDS + EXPIRATION_FUDGE
            )
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


def _refuse(state: RateLimitState, message: str) -> RateLimitExceeded:
    metrics.RATE_LIMITED.inc()
    retry_after = state.seconds_to_reset()
    # The openai client prefers retry-after-ms: to the millisecond, still never early.
    retry_after_ms = max(1, math.ceil((state.window_end + 1 - time.time()) * 1000))
    return RateLimitExceeded(
        message.format(retry_after=retry_after),
        code="rate_limit_exceeded",
        headers={
            **state.headers(),
            "Retry-After": str(retry_after),
            "retry-after-ms": str(retry_after_ms),
        },
    )


def _tenant_key(tenant_id: int) -> str:
    return f"tenant:{tenant_id}"


def _tokens_key(tenant_key: str, limits: Limits, end: int) -> str:
    return f"{TOKENS_KEY_PREFIX}:{tenant_key}:{limits.tokens_per_minute}:{end}"


def _requests_used(request: Request, tenant_key: str, limits: Limits) -> int:
    """Counts the request in its tenant's requests window (django-ratelimit); the count after."""
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
    return int(usage["count"])


# Tenants whose requests window this process saw spent, with that window's end second: their
# requests are counted on arrival (`may_count_with_tokens`), so a tenant past its limit is
# refused before any work on its body. Bounded like the cache's own memory of counters.
_spent_windows: dict[str, int] = {}
_SPENT_PRUNE_AT = 10_000


def _note_spent_window(tenant_key: str, end: int) -> None:
    if len(_spent_windows) >= _SPENT_PRUNE_AT:
        now = int(time.time())
        # list(): one step under the GIL, so another thread's insert cannot break the loop.
        for stale in [key for key, spent_end in list(_spent_windows.items()) if spent_end < now]:
            _spent_windows.pop(stale, None)
    _spent_windows[tenant_key] = end


def may_count_with_tokens(tenant_id: int) -> bool:
    """Whether a request of this tenant may be counted together with its tokens (one round trip,
    `count_request_with_tokens`) rather than on arrival: not while its window is known spent."""
    end = _spent_windows.get(_tenant_key(tenant_id))
    return end is None or end + 1 <= time.time()


def _state(tenant_key: str, limits: Limits, requests_used: int) -> RateLimitState:
    end = window_end(tenant_key)
    return RateLimitState(
        limit_requests=limits.requests_per_minute,
        remaining_requests=limits.requests_per_minute - requests_used,
        limit_tokens=limits.tokens_per_minute,
        remaining_tokens=None,
        window_end=end,
        tokens_key=_tokens_key(tenant_key, limits, end),
    )


def _refuse_requests(state: RateLimitState, tenant_key: str) -> RateLimitExceeded:
    _note_spent_window(tenant_key, state.window_end)
    return _refuse(
        with_remaining_tokens(state),
        f"Rate limit of {state.limit_requests} requests per minute reached; "
        "retry in {retry_after} s.",
    )


def count_request(*, request: Request, tenant_id: int, limits: Limits) -> RateLimitState | None:
    """Step 1: counts this request against the tenant's requests per minute.

    Raises RateLimitExceeded (429 with Retry-After) when the minute's requests are spent. When
    the cache is unreachable the outage is counted and logged, and the request goes on without
    limits (None) or is refused with 503, as RATE_LIMIT_FAIL_OPEN says."""
    tenant_key = _tenant_key(tenant_id)
    try:
        used = _requests_used(request, tenant_key, limits)
    except CacheUnavailable as exc:
        _backend_failed(exc)
        return None
    state = _state(tenant_key, limits, used)
    if used > limits.requests_per_minute:
        raise _refuse_requests(state, tenant_key)
    return state


def count_request_with_tokens(
    *, request: Request, tenant_id: int, limits: Limits, tokens: int
) -> RateLimitState | None:
    """Steps 1 and 2 at once, for a request whose tokens are known before it was counted: both
    counters change in one Redis round trip, the tokens riding on django-ratelimit's count of
    the request. The outcome is the same as `count_request` then `consume_tokens`: refused for
    its requests window first (its tokens given back), then for its tokens window."""
    tenant_key = _tenant_key(tenant_id)
    end = window_end(tenant_key)
    tokens_key = _tokens_key(tenant_key, limits, end)
    cache = caches[settings.RATELIMIT_USE_CACHE]
    with riding(
        str(cache.make_key(tokens_key)), tokens, timeout=WINDOW_SECONDS + EXPIRATION_FUDGE
    ) as rider:
        try:
            used = _requests_used(request, tenant_key, limits)
        except CacheUnavailable as exc:
            if rider.count is not None:  # counted, then found wanting: nothing of it counts
                _take_back(tokens_key, tokens)
            _backend_failed(exc)
            return None
    state = _state(tenant_key, limits, used)
    if rider.count is not None and state.window_end != end:
        # The count straddled a window's end: the tokens went to the window that just ended,
        # and count in the new one instead, as a step of their own.
        _take_back(tokens_key, tokens)
        rider.count = None
    if rider.count is None:  # it could not ride: counted as a step of its own
        if used > limits.requests_per_minute:
            raise _refuse_requests(state, tenant_key)
        consume_tokens(state=state, tokens=tokens)
        return state
    state.tokens_charged = tokens
    state.remaining_tokens = limits.tokens_per_minute - rider.count
    if used > limits.requests_per_minute:
        refund_tokens(state=state)
        raise _refuse_requests(state, tenant_key)
    _check_tokens(state, tokens=tokens, used=rider.count)
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
    state.tokens_charged = tokens
    _check_tokens(state, tokens=tokens, used=used)


def _check_tokens(state: RateLimitState, *, tokens: int, used: int) -> None:
    """Refuses (429) a request whose `tokens` took its window to `used`, past the limit; they
    are taken back first. Else the headers learn what is left."""
    if used > state.limit_tokens:
        _take_back(state.tokens_key, tokens)  # nothing of a refused request counts
        state.tokens_charged = 0
        state.remaining_tokens = state.limit_tokens - (used - tokens)
        if tokens > state.limit_tokens:
            raise _refuse(
                state,
                f"This request has {tokens} tokens, more than the tenant's limit of "
                f"{state.limit_tokens} tokens per minute; send fewer texts at once.",
            )
        raise _refuse(
            state,
            f"Rate limit of {state.limit_tokens} tokens per minute reached; "
            "retry in {retry_after} s.",
        )
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
