"""Tenants, plans, members, API keys and the usage they record.

A tenant is who pays: every embed request acts for exactly one tenant, charges its monthly quota
and counts against its rate limits. Users reach tenants through memberships; servers reach them
through API keys.
"""

from __future__ import annotations

import datetime

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Plan(models.Model):
    """Limits shared by many tenants. An empty limit falls back to the service-wide setting
    (RATE_LIMIT_PER_MIN, TOKENS_PER_MIN, MONTHLY_TOKEN_QUOTA, MAX_TEXTS_PER_REQUEST), which is how
    the default plan follows the environment."""

    name = models.CharField(max_length=64, unique=True)
    is_default = models.BooleanField(
        default=False, help_text="New tenants get this plan. Only one plan can be the default."
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    monthly_token_quota = models.PositiveBigIntegerField(null=True, blank=True)
    max_texts_per_request = models.PositiveIntegerField(null=True, blank=True)
    # Texts the tenant may have waiting for the model in one worker at once (429 beyond it);
    # empty: half the worker's queue (BATCH_QUEUE_MAX_TEXTS).
    max_texts_in_flight = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Texts one tenant may have waiting for the model in a worker at once; empty: "
        "half the worker's queue (BATCH_QUEUE_MAX_TEXTS).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_plan"
            )
        ]

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="tenants")
    # Set for the tenant created just in time for a user's first request; unique, so concurrent
    # first requests of one user end up with one personal tenant.
    personal_owner = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="personal_tenant",
    )
    # Per-tenant overrides of the plan's limits; empty means "as the plan says".
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    monthly_token_quota = models.PositiveBigIntegerField(null=True, blank=True)
    max_texts_per_request = models.PositiveIntegerField(null=True, blank=True)
    # Texts the tenant may have waiting for the model in one worker at once (429 beyond it);
    # empty: half the worker's queue (BATCH_QUEUE_MAX_TEXTS).
    max_texts_in_flight = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Texts one tenant may have waiting for the model in a worker at once; empty: "
        "half the worker's queue (BATCH_QUEUE_MAX_TEXTS).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        MEMBER = "member", "Member"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    is_default = models.BooleanField(
        default=False,
        help_text="A user's requests act for this tenant unless X-Tenant names another.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="one_membership_per_tenant"),
            models.UniqueConstraint(
                fields=["user"], condition=Q(is_default=True), name="one_default_tenant_per_user"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant}"


class SupabaseIdentity(models.Model):
    """Links a Supabase user (`sub`) to its local user."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="supabase_identity"
    )
    subject = models.CharField(max_length=255, unique=True)
    email = models.EmailField(blank=True)
    last_seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "Supabase identities"

    def __str__(self) -> str:
        return self.email or self.subject


class ApiKey(models.Model):
    """A tenant's key for server-to-server callers. Only a hash of the secret is stored; the
    public `prefix` finds the row, and the full key is shown once, at creation."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    hashed_key = models.CharField(max_length=128, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: datetime.datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class QuotaPeriod(models.Model):
    """What a tenant has been charged in one calendar month (UTC). The quota check and the charge
    are one conditional UPDATE on this row, so concurrent requests can never overspend."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_periods")
    period_start = models.DateField(help_text="First day of the month, UTC.")
    tokens = models.PositiveBigIntegerField(default=0)
    requests = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "period_start"], name="one_quota_row_per_month"
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.period_start:%Y-%m}"


class UsageLog(models.Model):
    """One row per embed request that passed authentication. Served requests carry the tokens
    they were charged; refused ones carry zero and say why."""

    # No index of its own: (tenant, created_at) serves every lookup by tenant, and each index
    # costs a write on every request.
    tenant = models.ForeignKey(
        Tenant,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="usage_logs",
        db_index=False,
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True)
    endpoint = models.CharField(max_length=32)
    model = models.CharField(max_length=255, blank=True)
    inputs = models.PositiveIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField()
    error_type = models.CharField(max_length=64, blank=True)
    latency_ms = models.FloatField()
    request_id = models.CharField(max_length=128)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            # The dashboard and /usage read by tenant and time; the admin filters by time alone.
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
            models.Index(fields=["created_at"], name="usage_time"),
            models.Index(fields=["request_id"], name="usage_request_id"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.status_code}"
