from django.contrib import admin
from django.urls import include, path

from embedplatform.metrics_view import metrics_view

urlpatterns = [
    path("", include("embeddings.urls")),
    path("", include("accounts.urls")),
    path("", include("embedplatform.docs_urls")),
    path("metrics", metrics_view, name="metrics"),
    # Before admin.site.urls, whose catch-all would otherwise answer /admin/usage/.
    path("admin/usage/", include("accounts.dashboard")),
    path("admin/", admin.site.urls),
]

handler400 = "embedplatform.errors.bad_request"
handler403 = "embedplatform.errors.permission_denied"
handler404 = "embedplatform.errors.page_not_found"
handler500 = "embedplatform.faults.server_error"
