from django.urls import path

# schema: describes these views in the OpenAPI document (drf-spectacular extensions register on
# import).
from embeddings import health, schema, views  # noqa: F401

urlpatterns = [
    path("embed", views.EmbedView.as_view(), name="embed"),
    path("batch-embed", views.BatchEmbedView.as_view(), name="batch-embed"),
    path("v1/embeddings", views.OpenAIEmbeddingsView.as_view(), name="openai-embeddings"),
    # Some OpenAI-compatible clients are configured with a base URL that has no /v1.
    path("embeddings", views.OpenAIEmbeddingsView.as_view(), name="embeddings"),
    path("health", health.HealthView.as_view(), name="health"),
]
