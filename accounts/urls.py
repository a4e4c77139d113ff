from django.urls import path

from accounts import views

urlpatterns = [path("usage", views.UsageView.as_view(), name="usage")]
