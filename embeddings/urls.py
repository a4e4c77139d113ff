from django.urls import path

from embeddings import views

urlpatterns = [
    path("embed", views.EmbedView.as_view(), name="embed"),
    path("batch-embed", views.BatchEmbedView.as_view(), name="batch-embed"),
    path("v1/embeddings", views.OpenAIEmbeddingsView.as_view(), name="openai-embeddings"),
    # Some OpenAI-compatible clients are configured with a base URL that has no /v1.
    path("embeddings", views.OpenAIEmbeddingsView.as_view(), name="embeddings"),
    path("health", views.HealthView.as_view(), name="health"),
]
