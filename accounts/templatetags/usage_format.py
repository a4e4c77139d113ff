"""Number formats and links for the usage dashboard (django.contrib.humanize is not installed)."""

from __future__ import annotations

from django import template
from django.conf import settings

register = template.Library()

NO_VALUE = "\N{EM DASH}"


@register.filter
def thousands(value: int | float | None) -> str:
    """12345 -> "12,345"; the dashboard shows exact counts, and tests read them back."""
    if value is None:
        return NO_VALUE
    return f"{round(value):,}"


@register.filter
def milliseconds(value: float | None) -> str:
    return NO_VALUE if value is None else f"{value:,.1f} ms"


@register.filter
def percent(fraction: float | None) -> str:
    return NO_VALUE if fraction is None else f"{fraction * 100:.1f}%"


@register.filter
def bar_width(fraction: float | None) -> str:
    """A CSS width for a fraction, clamped to the bar."""
    return f"{max(0.0, min(1.0, fraction or 0.0)) * 100:.1f}%"


@register.filter
def share_of(value: float, whole: float) -> float:
    return value / whole if whole else 0.0


@register.simple_tag
def prometheus_url() -> str:
    return str(settings.PROMETHEUS_URL)
