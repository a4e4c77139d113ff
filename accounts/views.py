"""The calling tenant's own usage."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import schema
from accounts.permissions import HasActiveTenant, resolve_tenant
from accounts.selectors import tenant_usage_summary
from accounts.serializers import UsageSummarySerializer


@extend_schema(**schema.USAGE)
class UsageView(APIView):
    """Plan and limits, this month's requests and tokens, the remaining quota, and daily totals
    for the last 30 days, all of the calling tenant only."""

    permission_classes = [IsAuthenticated, HasActiveTenant]

    def get(self, request: Request) -> Response:
        caller = resolve_tenant(request)
        assert caller.tenant is not None
        summary = tenant_usage_summary(tenant=caller.tenant)
        return Response(UsageSummarySerializer(summary).data)
