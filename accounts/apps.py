from __future__ import annotations

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from accounts import models
        from accounts.credential_cache import forget_all

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
