from __future__ import annotations

import logging

from django.apps import AppConfig
from django.conf import settings

logger = logging.getLogger(__name__)


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from embeddings.apps import is_serving_process

        if is_serving_process() and not settings.REDIS_URL:
            # Said once at start: limits are then per process, not shared across workers or hosts.
            logger.warning(
                "rate_limits_use_local_cache",
                extra={"detail": "REDIS_URL is not set; rate limits are counted per process."},
            )
