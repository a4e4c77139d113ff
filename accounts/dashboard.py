"""The operators' usage dashboard inside the admin: /admin/usage/ for the whole service and
/admin/usage/tenant/<id>/ for one tenant.

Charts are inline SVG drawn here, on the server, so the pages work offline with no script at all.
Only staff with permission to view usage logs get in; anybody else goes to the admin login.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path

from accounts import dashboard_selectors as usage
from accounts.models import Tenant
from accounts.selectors import current_period_start, effective_limits, next_period_start

VIEW_USAGE_PERMISSION = "accounts.view_usagelog"

# --- Charts ------------------------------------------------------------------------------------

# SVG user units; a chart scales to its box, and these widths keep the 11px labels at about
# their size in the admin's content column (wide: the whole column; narrow: half of it).
WIDE_CHART, NARROW_CHART = 1040, 520
CHART_HEIGHT = 190
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 44, 20, 10, 24


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    tone: str


@dataclass(frozen=True)
class Bar:
    title: str
    rects: list[Rect]
    # The whole slot of the day, so its tooltip shows even where the bar is empty.
    slot_x: float
    slot_width: float


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    legend: list[tuple[str, str]]
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    width: int = NARROW_CHART
    height: int = CHART_HEIGHT

    @property
    def wide(self) -> bool:
        return self.width > NARROW_CHART

    @property
    def plot_left(self) -> int:
        return _MARGIN_LEFT

    @property
    def plot_right(self) -> int:
        return self.width - _MARGIN_RIGHT

    @property
    def baseline(self) -> int:
        return self.height - _MARGIN_BOTTOM


def day_label(day: date) -> str:
    return f"{day:%b} {day.day}"


def compact_number(value: float) -> str:
    """Axis labels: 950, 1.2k, 3.4M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def nice_step(maximum: float, steps: int = 4) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) that covers `maximum` in about
    `steps` steps."""
    if maximum <= 0:
        return 1.0
    raw = maximum / steps
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude  # pragma: no cover (the loop always returns)


def bar_chart(
    *,
    title: str,
    days: Sequence[usage.DailyUsage],
    segments: Sequence[tuple[str, str, Callable[[usage.DailyUsage], float]]],
    describe: Callable[[usage.DailyUsage], str],
    width: int = NARROW_CHART,
) -> Chart:
    """One bar per day, made of stacked `segments` (legend label, tone, value of a day)."""
    totals = [sum(value(day) for _, _, value in segments) for day in days]
    step = nice_step(max(totals, default=0))
    top = step * max(1, math.ceil(max(totals, default=0) / step))
    plot_width = width - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_height = CHART_HEIGHT - _MARGIN_TOP - _MARGIN_BOTTOM
    baseline = CHART_HEIGHT - _MARGIN_BOTTOM
    slot = plot_width / max(1, len(days))
    bars = []
    for index, day in enumerate(days):
        x = _MARGIN_LEFT + index * slot + slot * 0.15
        bottom = float(baseline)
        rects = []
        for _, tone, value in segments:
            height = value(day) / top * plot_height
            if height > 0:
                # At least a hairline, so that a small non-zero day is visibly not zero.
                height = max(height, 1.0)
                bottom -= height
                rects.append(
                    Rect(
                        x=round(x, 1),
                        y=round(bottom, 1),
                        width=round(slot * 0.7, 1),
                        height=round(height, 1),
                        tone=tone,
                    )
                )
        bars.append(
            Bar(
                title=describe(day),
                rects=rects,
                slot_x=round(_MARGIN_LEFT + index * slot, 1),
                slot_width=round(slot, 1),
            )
        )
    y_ticks = [
        Tick(
            position=round(baseline - (step * n) / top * plot_height, 1),
            label=compact_number(step * n),
        )
        for n in range(round(top / step) + 1)
    ]
    # A label every week, counted back from today so that today is always labelled.
    x_ticks = [
        Tick(position=round(_MARGIN_LEFT + (index + 0.5) * slot, 1), label=day_label(day.day))
        for index, day in enumerate(days)
        if (len(days) - 1 - index) % 7 == 0
    ]
    return Chart(
        title=title,
        legend=[(label, tone) for label, tone, _ in segments] if len(segments) > 1 else [],
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        width=width,
    )


def usage_charts(window: usage.UsageWindow) -> list[Chart]:
    def served(day: usage.DailyUsage) -> float:
        return day.requests - day.errors

    return [
        bar_chart(
            title="Requests per day",
            days=window.days,
            segments=[
                ("Served", "primary", served),
                ("Errors", "error", lambda day: day.errors),
            ],
            describe=lambda day: (
                f"{day.day:%a} {day_label(day.day)}: "
                f"{day.requests:,} requests, {day.errors:,} errors"
            ),
            width=WIDE_CHART,
        ),
        bar_chart(
            title="Tokens per day",
            days=window.days,
            segments=[("Tokens", "tokens", lambda day: day.tokens)],
            describe=lambda day: f"{day.day:%a} {day_label(day.day)}: {day.tokens:,} tokens",
        ),
        bar_chart(
            title="p95 latency per day (ms)",
            days=window.days,
            segments=[("p95 latency", "latency", lambda day: day.p95_latency_ms or 0)],
            describe=lambda day: (
                f"{day.day:%a} {day_label(day.day)}: p95 "
                + (f"{day.p95_latency_ms:,.1f} ms" if day.p95_latency_ms is not None else "n/a")
            ),
        ),
    ]


# --- Views -------------------------------------------------------------------------------------


def _require_permission(request: HttpRequest) -> None:
    # admin_view has already sent anybody who is not active staff to the login page; among
    # staff, the dashboard shows every tenant's usage, so it takes the usage log's permission.
    if not request.user.has_perm(VIEW_USAGE_PERMISSION):
        raise PermissionDenied


def _context(request: HttpRequest, **extra: object) -> dict[str, object]:
    return {
        **admin.site.each_context(request),
        "prometheus_url": settings.PROMETHEUS_URL,
        "window_days": usage.WINDOW_DAYS,
        "percentile": round(usage.LATENCY_PERCENTILE * 100),
        **extra,
    }


def overview(request: HttpRequest) -> HttpResponse:
    _require_permission(request)
    window = usage.usage_window()
    quotas, charged_tenants = usage.quota_use()
    top = usage.top_tenants()
    return TemplateResponse(
        request,
        "admin/usage/overview.html",
        _context(
            request,
            title="Usage",
            window=window,
            charts=usage_charts(window),
            top_tenants=top,
            top_tokens=max((row.tokens for row in top), default=0),
            quotas=quotas,
            charged_tenants=charged_tenants,
            period_start=current_period_start(),
            period_end=next_period_start(),
            breakdowns=usage.breakdowns(),
        ),
    )


def tenant_usage(request: HttpRequest, tenant_id: int) -> HttpResponse:
    _require_permission(request)
    tenant = get_object_or_404(Tenant.objects.select_related("plan"), pk=tenant_id)
    window = usage.usage_window(tenant=tenant)
    return TemplateResponse(
        request,
        "admin/usage/tenant.html",
        _context(
            request,
            title=f"Usage of {tenant.name}",
            tenant=tenant,
            limits=effective_limits(tenant),
            window=window,
            charts=usage_charts(window),
            quota=usage.tenant_quota_use(tenant=tenant),
            period_end=next_period_start(),
            breakdowns=usage.breakdowns(tenant=tenant),
        ),
    )


app_name = "usage"
urlpatterns = [
    path("", admin.site.admin_view(overview), name="overview"),
    path("tenant/<int:tenant_id>/", admin.site.admin_view(tenant_usage), name="tenant"),
]
