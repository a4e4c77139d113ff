"""The DRF side of metering: an APIView base that opens a Meter for each POST and closes it on
the response, so that views only translate HTTP."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.metering.meter import Meter
from accounts.services import Caller


class MeteredAPIView(APIView):
    """A POST that passed authentication counts against the tenant's requests per minute and
    leaves exactly one usage row (served: charged; refused: zero tokens, with its error type);
    every POST is counted in the metrics, and from the rate-limit step on its response carries
    the tenant's x-ratelimit-* headers. Other methods (OPTIONS, the browsable API's page) are
    not metered."""

    endpoint = ""
    meter: Meter | None = None
    # Whether a request may count against requests per minute together with its tokens, in one
    # round trip (Meter.admit): for views whose service calls `Meter.reserve`.
    counts_requests_with_tokens = False

    def served_model(self) -> str:
        """The model name the usage log records."""
        return ""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        if request.method != "POST":
            self.meter = None
            super().initial(request, *args, **kwargs)
            return
        meter = self.meter = Meter(
            endpoint=self.endpoint,
            request_id=getattr(request._request, "request_id", ""),
            model=self.served_model(),
        )
        with meter.timed("auth"):  # authentication (which decides the tenant), permissions
            super().initial(request, *args, **kwargs)
        meter.admit(request, count_with_tokens=self.counts_requests_with_tokens)

    def handle_exception(self, exc: Exception) -> Response:
        if self.meter is not None:
            try:
                self.meter.count_now()
            except APIException as refusal:  # past the limit (429), or no cache and fail-closed
                exc = refusal
        return super().handle_exception(exc)

    def perform_authentication(self, request: Request) -> None:
        super().perform_authentication(request)
        # Here, where authentication has just succeeded: finish must never trigger
        # authentication itself (that would run outside DRF's error handling).
        if self.meter is not None and isinstance(request.auth, Caller):
            self.meter.identify(request.auth)

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        if self.meter is not None:
            self.meter.finish(response)
        return response
