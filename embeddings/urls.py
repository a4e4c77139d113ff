from django.urls import path

# schema: describes these views in the OpenAPI document (drf-spectacular extensions register on
# import).
from embeddings import health, schema, views  # noqa: F401
from embeddings.models_api import (
    ModelDetailView,
    ModelDetailWithoutV1View,
    ModelsView,
    ModelsWithoutV1View,
)
from embeddings.tokenizer_api import DecodeView, TokenizeView

urlpatterns = [
    path("embed", views.EmbedView.as_view(), name="embed"),
    path("batch-embed", views.BatchEmbedView.as_view(), name="batch-embed"),
    path("v1/embeddings", views.OpenAIEmbeddingsView.as_view(), name="openai-embeddings"),
    path("v1/models", ModelsView.as_view(), name="openai-models"),
    path("v1/models/<path:model_id>", ModelDetailView.as_view(), name="openai-model"),
    # As /embeddings below: for clients whose base URL has no /v1.
    path("models", ModelsWithoutV1View.as_view(), name="models"),
    path("models/<path:model_id>", ModelDetailWithoutV1View.as_view(), name="model"),
    # Some OpenAI-compatible clients are configured with a base URL that has no /v1.
    path("embeddings", views.OpenAIEmbeddingsView.as_view(), name="embeddings"),
    path("tokenize", TokenizeView.as_view(), name="tokenize"),
    path("decode", DecodeView.as_view(), name="decode"),
    path("health", health.HealthView.as_view(), name="health"),
]
