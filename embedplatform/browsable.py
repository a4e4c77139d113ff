"""The DRF browsable API on the POST-only embed endpoints, for staff trying them by hand.

Opened in a browser, an embed endpoint shows its description and a JSON form that starts from a
working example; the form POSTs with the page's CSRF token and the answer is shown on the page.
API clients are unaffected: a GET that does not ask for HTML is still a 405.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.urls import reverse
from rest_framework import serializers
from rest_framework.renderers import BrowsableAPIRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from embeddings.schema import form_example


def wants_browsable_page(request: Request) -> bool:
    return isinstance(getattr(request, "accepted_renderer", None), BrowsableAPIRenderer)


if TYPE_CHECKING:
    # A mixin for APIViews: the checker sees the view it is mixed into.
    _MixedIntoView = APIView
else:
    _MixedIntoView = object


class BrowsableForm(_MixedIntoView):
    """For a metered APIView with `serializer_class` (its input) and `endpoint`."""

    serializer_class: type[serializers.Serializer]
    endpoint: str

    def get_serializer(self, *args: Any, **kwargs: Any) -> serializers.Serializer:
        # The browsable API fills its raw-data form from an unbound serializer's data: showing
        # the example with every option at its default tells the user what can be sent.
        if not args and not {"data", "instance"} & kwargs.keys():
            kwargs["instance"] = form_example(self.endpoint)
        return self.serializer_class(*args, **kwargs)

    # DRF hands its own Request here; django-stubs types View's with HttpRequest, and
    # rest_framework-stubs' APIView ignores the same [override] for the same reason.
    def http_method_not_allowed(  # type: ignore[override]
        self, request: Request, *args: Any, **kwargs: Any
    ) -> Response:
        if request.method == "GET" and wants_browsable_page(request):
            # Only POSTs are metered (MeteredEmbedView.initial): this page costs nothing.
            return Response(
                {
                    "usage": f"POST a JSON body to {request.path}: edit the example below and "
                    "press POST. Programs send it with Authorization: Bearer <Supabase access "
                    "token or tenant API key>.",
                    "example": form_example(self.endpoint),
                    "documentation": request.build_absolute_uri(reverse("swagger-ui")),
                }
            )
        return super().http_method_not_allowed(request, *args, **kwargs)
