"""One metered request, from its caller to its usage row.

The life of a request, in order: the caller is identified (authentication, which also decides
the tenant), the tenant's limits are worked out and the request counts against requests per
minute (`admit`), the number of texts is checked (`check_inputs`), its tokens count against
tokens per minute and the monthly quota is pre-checked (`reserve`), and then it ends exactly
once, as `served` (charged, with its usage row, in one transaction) or `refused` (a usage row
with zero tokens, and the minute's tokens given back). `finish` puts the outcome on the
response: a refusal row if nothing was recorded yet, the x-ratelimit-* headers, Server-Timing
and the metrics.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from django.http.response import HttpResponseBase
from rest_framework.exceptions import APIException
from rest_framework.request import Request

from accounts import ratelimit
from accounts.metering import ledger
from accounts.models import Tenant
from accounts.selectors import Limits, effective_limits
from accounts.services import Caller
from embedplatform import metrics
from embedplatform.errors import PayloadTooLarge
from embedplatform.shutdown import wait_for_result

Outcome = Literal["served", "refused"]
T = TypeVar("T")

# The largest body whose request may be counted with its tokens, after parsing and tokenizing:
# a 1-text query is well under it, and a tenant past its limit can make this process do at
# most this much work per request before its 429 (then its window is known spent here).
COUNT_WITH_TOKENS_MAX_BODY = 16 * 1024


def _body_length(request: Request) -> int:
    """The body's declared length; unknown (chunked) counts as too large."""
    try:
        return int(request._request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return COUNT_WITH_TOKENS_MAX_BODY + 1


@dataclass
class Meter:
    endpoint: str
    request_id: str
    model: str = ""
    started: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    limits: Limits | None = None
    rate_limit: ratelimit.RateLimitState | None = None
    inputs: int = 0
    tokens: int = 0
    outcome: Outcome | None = None
    # The request `admit` left to be counted with its tokens; None once counted.
    _uncounted: Request | None = None
    # Milliseconds per phase, sent back as Server-Timing so callers (and bench/) can see where a
    # request's time went: the identity layer versus the model.
    timings: dict[str, float] = field(default_factory=dict)

    # --- the steps, in order ---------------------------------------------------------------

    def identify(self, caller: Caller) -> None:
        """Authentication succeeded: from here on the request leaves a usage row."""
        self.caller = caller

    @property
    def tenant(self) -> Tenant:
        """The tenant the request acts for; set once authentication and permissions passed."""
        assert self.caller is not None
        assert self.caller.tenant is not None
        return self.caller.tenant

    def admit(self, request: Request, *, count_with_tokens: bool = False) -> None:
        """The tenant's limits, and this request against its requests per minute (429).

        With `count_with_tokens` a small request is counted later, in one Redis round trip with
        its tokens (`reserve`), or when it is refused before that (`count_now`): either way
        it counts once, and a request past the limit is answered 429 whatever else is wrong
        with it. A large one, or one of a tenant whose window this process saw spent, is
        counted now, before any work on its body."""
        with self.timed("ratelimit"):
            self.limits = effective_limits(self.tenant)
        self._uncounted = request
        if not (
            count_with_tokens
            and _body_length(request) <= COUNT_WITH_TOKENS_MAX_BODY
            and ratelimit.may_count_with_tokens(self.tenant.pk)
        ):
            self.count_now()

    def count_now(self) -> None:
        """Counts the request against requests per minute (429 past the limit), unless it is
        counted already: on arrival (`admit`), or when it ends before `reserve` counted it."""
        request, self._uncounted = self._uncounted, None
        if request is None:
            return
        assert self.limits is not None
        with self.timed("ratelimit"):
            self.rate_limit = ratelimit.count_request(
                request=request, tenant_id=self.tenant.pk, limits=self.limits
            )

    def check_inputs(self, *, count: int, param: str, limit: int | None = None) -> None:
        """At most `limit` texts, by default the plan's texts per request (413)."""
        assert self.limits is not None
        self.inputs = count
        limit = self.limits.max_texts_per_request if limit is None else limit
        if count > limit:
            raise PayloadTooLarge(
                f"A request may carry at most {limit} texts; this one has {count}.",
                code="too_many_inputs",
                param=param,
            )

    def reserve(self, *, tokens: int) -> None:
        """The tokens against tokens per minute (429), then the monthly quota pre-check (429)."""
        self.tokens = tokens
        with self.timed("ratelimit"):
            request, self._uncounted = self._uncounted, None
            if request is None:
                ratelimit.consume_tokens(state=self.rate_limit, tokens=tokens)
            else:
                assert self.limits is not None
                self.rate_limit = ratelimit.count_request_with_tokens(
                    request=request, tenant_id=self.tenant.pk, limits=self.limits, tokens=tokens
                )
        with self.timed("quota"):
            ledger.check_quota(tenant_id=self.tenant.pk, tokens=tokens)

    def served(self) -> None:
        """Charges the reserved tokens and writes the usage row, atomically; raises
        QuotaExceeded when the quota has no room left by now (then nothing is charged)."""
        if self.outcome is not None:
            return
        with self.timed("charge"):
            ledger.charge_and_log(record=self._record(status_code=200, tokens=self.tokens))
        self._count_served()

    def _count_served(self) -> None:
        self.outcome = "served"
        metrics.child(metrics.TOKENS, self.endpoint).inc(self.tokens)
        metrics.child(metrics.INPUTS, self.endpoint).inc(self.inputs)

    def served_when_done(self, future: Future[T], *, timeout: float) -> T:
        """The model's answer in `future` (FutureTimeout past `timeout`, and the future is
        cancelled), then `served`. Where charges are committed in groups the model's answer
        queues the charge itself, so the request thread wakes once instead of twice; a request
        that times out then withdraws its charge, or waits for it if it is being committed."""
        charge = ledger.charge_after_model(
            future=future,
            tenant_id=self.tenant.pk,
            record=lambda: self._record(status_code=200, tokens=self.tokens),
        )
        if charge is None:
            with self.timed("model"):
                answer = wait_for_result(future, timeout)
            self.served()
            return answer
        waiting_since = time.perf_counter()
        try:
            charge.wait(future, timeout=timeout)
        finally:
            model_done_at = charge.pending.model_done_at or time.perf_counter()
            self._add_time("model", model_done_at - waiting_since)
            self._add_time("charge", time.perf_counter() - model_done_at)
        answer = future.result()  # the model's own error, if it failed
        with self.timed("charge"):
            charge.settle()
        self._count_served()
        return answer

    def served_uncharged(self) -> None:
        """Writes the usage row of a served request that costs no tokens (/tokenize, /decode):
        logged like any other, charged nothing, and no quota row is touched."""
        if self.outcome is not None:
            return
        self.tokens = 0
        with self.timed("charge"):
            ledger.log_uncharged(record=self._record(status_code=200, tokens=0))
        self.outcome = "served"
        metrics.child(metrics.INPUTS, self.endpoint).inc(self.inputs)

    def refused(self, *, status_code: int, error_type: str) -> None:
        """Logs the refusal with zero tokens and gives the minute's tokens back. Does nothing
        for a request already served or refused, or one whose caller is unknown."""
        if self.outcome is not None or self.caller is None:
            return
        ratelimit.refund_tokens(state=self.rate_limit)
        ledger.log_refusal(
            record=self._record(status_code=status_code, tokens=0, error_type=error_type)
        )
        self.outcome = "refused"

    def finish(self, response: HttpResponseBase) -> None:
        """Puts the outcome on the response, whatever it was: DRF's Response, or the plain
        HttpResponse the embed views answer API clients with."""
        if self._uncounted is not None:  # ended without `reserve` or an exception: counted now
            try:
                self.count_now()
            except APIException as refusal:  # it has its answer already; the headers say why
                for name, value in getattr(refusal, "headers", {}).items():
                    response.headers.setdefault(name, value)
        status_code = response.status_code
        error_type = ""
        if status_code >= 400:
            payload = getattr(response, "data", None)
            data = payload if isinstance(payload, dict) else {}
            error = data.get("error")
            error_type = str(error.get("type", "error")) if isinstance(error, dict) else "error"
            self.refused(status_code=status_code, error_type=error_type)
        if self.rate_limit is not None:
            headers = ratelimit.with_remaining_tokens(self.rate_limit).headers()
            for name, value in headers.items():
                response.headers.setdefault(name, value)
        response["Server-Timing"] = self.server_timing()
        metrics.child(metrics.REQUESTS, self.endpoint, str(status_code)).inc()
        metrics.child(metrics.REQUEST_DURATION, self.endpoint).observe(self.elapsed_ms() / 1000)
        if status_code >= 400:
            metrics.child(metrics.ERRORS, self.endpoint, error_type).inc()

    # --- bookkeeping -----------------------------------------------------------------------

    def timed(self, phase: str) -> _Phase:
        """A `with` block whose time adds to `phase`."""
        return _Phase(self.timings, phase)

    def _add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds * 1000.0

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    def server_timing(self) -> str:
        phases = [f"{name};dur={value:.2f}" for name, value in self.timings.items()]
        return ", ".join([*phases, f"total;dur={self.elapsed_ms():.2f}"])

    def _record(self, *, status_code: int, tokens: int, error_type: str = "") -> ledger.UsageRecord:
        assert self.caller is not None
        return ledger.UsageRecord(
            caller=self.caller,
            endpoint=self.endpoint,
            model=self.model,
            inputs=self.inputs,
            tokens=tokens,
            status_code=status_code,
            latency_ms=self.elapsed_ms(),
            request_id=self.request_id,
            error_type=error_type,
        )


class _Phase:
    """Adds the time spent in a `with` block to a phase of `Meter.timings`. A class, not a
    generator-based context manager: those cost several times as much, and each request times
    half a dozen phases."""

    __slots__ = ("_phase", "_started", "_timings")

    def __init__(self, timings: dict[str, float], phase: str) -> None:
        self._timings = timings
        self._phase = phase
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        elapsed = (time.perf_counter() - self._started) * 1000.0
        self._timings[self._phase] = self._timings.get(self._phase, 0.0) + elapsed
