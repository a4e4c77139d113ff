"""Configuration warnings as Django system checks, so `manage.py check --deploy` lists them.

They are deployment checks: a development server on the embedded default (no Redis, a generated
JWT secret) is what that default is for. gunicorn runs no system checks, so a serving process also
logs each warning once at start (`log_configuration_warnings`, called by
embedplatform/serving.py), under the event name operators already watch for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Tags, register
from django.core.checks import Warning as CheckWarning

logger = logging.getLogger(__name__)

RATE_LIMITS_USE_LOCAL_CACHE = "embedplatform.W001"
SUPABASE_NOT_CONFIGURED = "embedplatform.W002"

# The log event each warning keeps at start-up.
LOG_EVENTS = {
    RATE_LIMITS_USE_LOCAL_CACHE: "rate_limits_use_local_cache",
    SUPABASE_NOT_CONFIGURED: "supabase_not_configured",
}


@register(Tags.caches, deploy=True)
def check_rate_limit_cache(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    if settings.REDIS_URL:
        return []
    return [
        CheckWarning(
            "REDIS_URL is not set; rate limits are counted per process.",
            hint="Set REDIS_URL so that every worker and host shares one count.",
            id=RATE_LIMITS_USE_LOCAL_CACHE,
        )
    ]


@register(Tags.security, deploy=True)
def check_supabase_configured(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    # DEBUG runs on the generated secret on purpose (manage.py mint_dev_token).
    if settings.DEBUG or not settings.SUPABASE_JWT_SECRET_GENERATED:
        return []
    return [
        CheckWarning(
            "Neither SUPABASE_URL nor SUPABASE_JWT_SECRET is set; only development tokens "
            "signed with a generated secret are accepted.",
            hint="Set SUPABASE_URL (JWKS) or SUPABASE_JWT_SECRET (HS256) of the project.",
            id=SUPABASE_NOT_CONFIGURED,
        )
    ]


CONFIGURATION_CHECKS: tuple[Callable[..., list[CheckMessage]], ...] = (
    check_rate_limit_cache,
    check_supabase_configured,
)


def log_configuration_warnings() -> None:
    """Logs the configuration warnings once, at the start of a serving process."""
    for check in CONFIGURATION_CHECKS:
        for message in check():
            logger.warning(
                LOG_EVENTS[str(message.id)], extra={"detail": message.msg, "check": message.id}
            )
