"""API documentation: the OpenAPI schema, Swagger UI and ReDoc, all served from this host (the
UIs' files come from drf-spectacular-sidecar, no CDN) and open without a credential."""

from django.urls import path
from drf_spectacular.views import (
    SpectacularJSONAPIView,
    SpectacularRedocView,
    SpectacularSwaggerView,
)

urlpatterns = [
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="openapi-schema"), name="swagger-ui"),
    path(
        "redoc",
        # drf-spectacular's own page loads its fonts from Google; ours works offline.
        SpectacularRedocView.as_view(url_name="openapi-schema", template_name="docs/redoc.html"),
        name="redoc",
    ),
]
