from __future__ import annotations

import logging

from django.apps import AppConfig
from django.conf import settings

logger = logging.getLogger(__name__)


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from accounts import models
        from accounts.credential_cache import forget_all
        from embeddings.apps import is_serving_process

        for model in (
            models.Plan,
            models.Tenant,
            models.Membership,
            models.ApiKey,
            models.SupabaseIdentity,
            get_user_model(),
        ):
            post_save.connect(forget_all, sender=model, dispatch_uid=f"forget-{model.__name__}")
            post_delete.connect(forget_all, sender=model, dispatch_uid=f"unforget-{model.__name__}")

        if is_serving_process() and not settings.REDIS_URL:
            # Said once at start: limits are then per process, not shared across workers or hosts.
            logger.warning(
                "rate_limits_use_local_cache",
                extra={"detail": "REDIS_URL is not set; rate limits are counted per process."},
            )
        if is_serving_process() and not settings.DEBUG and settings.SUPABASE_JWT_SECRET_GENERATED:
            # The embedded default runs like this, so it is no error; but a production service
            # would accept only tokens signed with a secret it made up itself (mint_dev_token).
            logger.warning(
                "supabase_not_configured",
                extra={
                    "detail": "Neither SUPABASE_URL nor SUPABASE_JWT_SECRET is set; only "
                    "development tokens signed with a generated secret are accepted."
                },
            )
