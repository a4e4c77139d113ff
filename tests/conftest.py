"""Shared fixtures: the machine's PostgreSQL and Redis, real and fake encoders, and three people.

alice owns the tenant "Alice's team"; bob is a member of it (and of nothing else); charlie has a
tenant of his own and no access to theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.cache import cache
from django.test import Client
from django.test.client import ClientHandler
from django.utils import timezone
from rest_framework.test import APIClient

from accounts import services
from accounts.jwt import mint_token
from accounts.metering import ledger
from accounts.models import Membership, SupabaseIdentity, Tenant, UsageLog
from embeddings import encoder as encoder_module
from embeddings import runtime
from embedplatform.handler import load_split_middleware

OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(autouse=True, scope="session")
def _test_client_chains_as_served() -> Iterator[None]:
    """Django's test client (and DRF's) builds its own handler: give it the middleware chains
    gunicorn serves (embedplatform/handler.py), so that a bearer call in a test skips what it
    skips in production."""

    def load_middleware(handler: ClientHandler, is_async: bool = False) -> None:
        load_split_middleware(handler, is_async=is_async)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClientHandler, "load_middleware", load_middleware)
        yield


class FakeEncoder:
    """A deterministic stand-in for the model, for unit tests of the code around it: one token
    per whitespace-separated word plus two special tokens, and vectors derived from a hash of the
    prompted text. It records every call, so tests can assert that no model work happened."""

    name = "fake-model"
    dtype = "fp32"
    dimensions = 16
    max_seq_length = 64
    prompts = {"query": "query: ", "document": "doc: "}
    default_prompt_name: str | None = None
    vocab_size = 1000

    def __init__(self) -> None:
        self.encoded: list[list[str]] = []

    def count_tokens(self, texts: list[str], prompt: str) -> list[int]:
        return [min(self.max_seq_length, len((prompt + text).split()) + 2) for text in texts]

    def tokenize(
        self, texts: list[str], *, prompt: str, truncation_direction: str = "right"
    ) -> encoder_module.Tokenized:
        whole = [len((prompt + text).split()) + 2 for text in texts]
        return encoder_module.Tokenized(
            prompt=prompt,
            inputs=list(texts),
            token_counts=self.count_tokens(texts, prompt),
            truncated=[count > self.max_seq_length for count in whole],
            input_token_counts=whole,
            counted_in_full=[True] * len(texts),
            max_seq_length=self.max_seq_length,
        )

    def encode_tokenized(self, inputs: list[str], prompt: str) -> np.ndarray:
        return self.encode(inputs, prompt)

    def encode(self, texts: list[str], prompt: str) -> np.ndarray:
        self.encoded.append(list(texts))
        rows = []
        for text in texts:
            digest = hashlib.sha256((prompt + text).encode("utf-8", "surrogatepass")).digest()
            rows.append(
                np.frombuffer(digest[: self.dimensions * 2], dtype=np.uint8)[: self.dimensions]
            )
        vectors = np.asarray(rows, dtype=np.float32) - 127.5
        normalized: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return normalized

    def decode_token_ids(self, token_ids: list[int]) -> str:
        return " ".join(f"t{token_id}" for token_id in token_ids)

    def token_pieces(
        self, texts: list[str], *, add_special_tokens: bool
    ) -> list[list[encoder_module.TokenPiece]]:
        rows = []
        for text in texts:
            pieces = []
            for match in re.finditer(r"\S+", text):
                word = match.group()
                token_id = int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.vocab_size
                pieces.append(encoder_module.TokenPiece(token_id, word, False, *match.span()))
            if add_special_tokens:
                pieces = [encoder_module.TokenPiece(1, "", True, 0, 0), *pieces]
                pieces.append(encoder_module.TokenPiece(2, "", True, 0, 0))
            rows.append(pieces)
        return rows

    @property
    def texts_encoded(self) -> int:
        return sum(len(batch) for batch in self.encoded)


@pytest.fixture
def fake_encoder() -> Iterator[FakeEncoder]:
    encoder = FakeEncoder()
    runtime.install_runtime(encoder)
    yield encoder
    runtime.install_runtime(None)


@pytest.fixture(scope="session")
def minilm_encoder() -> encoder_module.SentenceTransformerEncoder:
    """The bundled all-MiniLM-L6-v2, loaded once for the session."""
    return encoder_module.load_encoder(
        model_name="", quantization="fp32", max_seq_length=256, hf_token=None
    )


@pytest.fixture
def minilm(minilm_encoder: encoder_module.SentenceTransformerEncoder) -> Iterator[Any]:
    runtime.install_runtime(minilm_encoder)
    yield minilm_encoder
    runtime.install_runtime(None)


@pytest.fixture(scope="session")
def gemma_tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised model with EmbeddingGemma's architecture, built offline."""
    from bench.gemma_builder import build_gemma_like_model

    return build_gemma_like_model(tmp_path_factory.mktemp("models") / "gemma-tiny", size="tiny")


@pytest.fixture(scope="session")
def gemma_encoder(gemma_tiny_path: Path) -> encoder_module.SentenceTransformerEncoder:
    return encoder_module.load_encoder(
        model_name=str(gemma_tiny_path),
        quantization="fp32",
        max_seq_length=2048,
        hf_token=None,
    )


@pytest.fixture
def gemma(gemma_encoder: encoder_module.SentenceTransformerEncoder) -> Iterator[Any]:
    runtime.install_runtime(gemma_encoder)
    yield gemma_encoder
    runtime.install_runtime(None)


@pytest.fixture(autouse=True)
def _fresh_rate_limits() -> Iterator[None]:
    """Rate-limit windows are per tenant id; ids restart with each test database."""
    yield
    # A test that took Redis away must not fail the next one's teardown.
    with contextlib.suppress(Exception):
        cache.clear()


@pytest.fixture(autouse=True)
def _charge_writer_closed() -> Iterator[None]:
    """A test whose requests charged through the group-commit writer leaves no connection of
    it open (the test database could not be dropped)."""
    yield
    ledger.close_charge_groups()


@dataclass
class Person:
    user: Any
    tenant: Tenant
    subject: str
    email: str
    extra_claims: dict[str, Any] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return mint_token(subject=self.subject, email=self.email, extra=self.extra_claims)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def client_headers(self) -> dict[str, Any]:
        """The same, in the form Django's test client takes."""
        # Any: spread as **extra into Client.get/post, whose other keywords are not all str.
        return {"HTTP_AUTHORIZATION": f"Bearer {self.token}"}


def _person(name: str) -> tuple[str, str]:
    return str(uuid.uuid4()), f"{name}@example.com"


@pytest.fixture
def alice(db: None) -> Person:
    subject, email = _person("alice")
    user = services.provision_supabase_user(subject=subject, email=email)
    tenant = Tenant.objects.get(personal_owner=user)
    tenant.name = "Alice's team"
    tenant.save(update_fields=["name"])
    return Person(user=user, tenant=tenant, subject=subject, email=email)


@pytest.fixture
def bob(alice: Person) -> Person:
    subject, email = _person("bob")
    user = services.UserModel.objects.create(username=f"supabase:{subject}", email=email)
    SupabaseIdentity.objects.create(user=user, subject=subject, email=email)
    services.add_member(tenant=alice.tenant, user=user, role=Membership.Role.MEMBER)
    return Person(user=user, tenant=alice.tenant, subject=subject, email=email)


@pytest.fixture
def charlie(db: None) -> Person:
    subject, email = _person("charlie")
    user = services.provision_supabase_user(subject=subject, email=email)
    tenant = Tenant.objects.get(personal_owner=user)
    tenant.name = "Charlie's tenant"
    tenant.save(update_fields=["name"])
    return Person(user=user, tenant=tenant, subject=subject, email=email)


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def output_dir() -> Path:
    """Where tests leave artefacts worth looking at (screenshots, reports)."""
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture
def supabase(settings: Any) -> Iterator[Any]:
    """A fake Supabase project on 127.0.0.1 (tests/jwks_server.py) that the service trusts for the
    test: SUPABASE_URL, its JWKS and its anon key point at it, and it signs with the same legacy
    secret, so HS256 and asymmetric tokens work side by side."""
    from tests.jwks_server import FakeSupabase

    with FakeSupabase(jwt_secret=settings.SUPABASE_JWT_SECRET) as project:
        project.configure(settings)
        yield project


@pytest.fixture
def frozen_rate_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stops the rate-limit clock, so a test never straddles two one-minute windows (which would
    reset its counters half-way through)."""
    import time
    import types

    import django_ratelimit.core

    import accounts.ratelimit

    now = time.time()
    frozen = types.SimpleNamespace(time=lambda: now)
    monkeypatch.setattr(accounts.ratelimit, "time", frozen)
    monkeypatch.setattr(django_ratelimit.core, "time", frozen)
    # Which tenants' windows this process saw spent is the test's own business.
    monkeypatch.setattr(accounts.ratelimit, "_spent_windows", {})


@pytest.fixture
def operator(django_user_model: Any) -> Any:
    """A superuser: what an operator logs into the admin with."""
    return django_user_model.objects.create_superuser(
        username="operator", email="operator@example.com", password="correct horse battery"
    )


@pytest.fixture
def operator_client(operator: Any) -> Client:
    client = Client()
    client.force_login(operator)
    return client


def usage_row(tenant: Tenant | None, **fields: Any) -> UsageLog:
    """A usage log row as a served /embed request leaves it; `fields` override."""
    values: dict[str, Any] = {
        "endpoint": "embed",
        "model": "fake-model",
        "inputs": 1,
        "tokens": 10,
        "status_code": 200,
        "latency_ms": 20.0,
        "request_id": f"req-{random.getrandbits(48):012x}",
        "created_at": timezone.now(),
    }
    values.update(fields)
    return UsageLog.objects.create(tenant=tenant, **values)
