"""Output shapes of the account endpoints: they render the answer and describe it in the OpenAPI
document, from the selectors' objects."""

from __future__ import annotations

from rest_framework import serializers


class UsageTenantSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="pk", help_text="The id to send as `X-Tenant`.")
    name = serializers.CharField(help_text="The tenant's name.")
    is_active = serializers.BooleanField(help_text="An inactive tenant's calls get 403.")


class UsagePlanSerializer(serializers.Serializer):
    """The tenant's plan and the limits in force."""

    name = serializers.CharField(source="tenant.plan.name", help_text="The plan's name.")
    requests_per_minute = serializers.IntegerField(
        source="limits.requests_per_minute", help_text="Embed requests per minute."
    )
    tokens_per_minute = serializers.IntegerField(
        source="limits.tokens_per_minute", help_text="Tokens embedded per minute."
    )
    monthly_token_quota = serializers.IntegerField(
        source="limits.monthly_token_quota", help_text="Tokens per calendar month (UTC)."
    )
    max_texts_per_request = serializers.IntegerField(
        source="limits.max_texts_per_request", help_text="Texts in one request."
    )


class UsagePeriodSerializer(serializers.Serializer):
    start = serializers.DateField(
        source="period_start", help_text="First day of this quota month (UTC)."
    )
    end = serializers.DateField(source="period_end", help_text="First day of the next one.")
    requests = serializers.IntegerField(
        source="use.requests", help_text="Requests served this month."
    )
    tokens = serializers.IntegerField(source="use.tokens", help_text="Tokens charged this month.")
    remaining_tokens = serializers.IntegerField(help_text="What is left of the monthly quota.")


class UsageDaySerializer(serializers.Serializer):
    date = serializers.DateField(source="day", help_text="The day (UTC).")
    requests = serializers.IntegerField(help_text="Requests logged that day, refused ones too.")
    tokens = serializers.IntegerField(help_text="Tokens charged that day.")


class UsageSummarySerializer(serializers.Serializer):
    """The calling tenant's limits and use."""

    # Renders selectors.UsageSummary; plan and period read several of its attributes.
    tenant = UsageTenantSerializer(help_text="The tenant the caller acts for.")
    plan = UsagePlanSerializer(
        source="*", help_text="The limits in force: the tenant's own or its plan's."
    )
    period = UsagePeriodSerializer(source="*", help_text="This quota month.")
    daily = UsageDaySerializer(many=True, help_text="The last 30 days, oldest first.")
