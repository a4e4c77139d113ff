from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("embeddings.urls")),
    path("", include("accounts.urls")),
    path("", include("django_prometheus.urls")),
    path("admin/", admin.site.urls),
]

handler400 = "embedplatform.errors.bad_request"
handler403 = "embedplatform.errors.permission_denied"
handler404 = "embedplatform.errors.page_not_found"
handler500 = "embedplatform.errors.server_error"
