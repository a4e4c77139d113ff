"""The runtime tokenizes each text once, cut to what the model can read, and runs the model on
those token ids with the same result as `SentenceTransformer.encode`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from accounts.models import UsageLog
from embeddings import encoder as encoder_module
from embeddings import runtime
from tests.conftest import Person
from tests.service import Service, start_service

TEXTS = [
    "hello world",
    "A much longer text about embeddings, tenants and quotas. " * 15,
    "ünïcödé, 漢字 and emoji 🙂 in one text",
    "x",
    "word " * 3000,  # over every model's limit: truncated
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def reference(
    encoder: encoder_module.SentenceTransformerEncoder, texts: list[str], prompt: str
) -> Any:
    return encoder.model.encode(
        texts,
        prompt=prompt or None,
        convert_to_numpy=True,
        normalize_embeddings=False,
        show_progress_bar=False,
    )


@pytest.fixture(params=["minilm_encoder", "gemma_encoder"])
def encoder(request: pytest.FixtureRequest) -> encoder_module.SentenceTransformerEncoder:
    value: encoder_module.SentenceTransformerEncoder = request.getfixturevalue(request.param)
    return value


@pytest.fixture
def run(encoder: encoder_module.SentenceTransformerEncoder) -> Iterator[runtime.Runtime]:
    current = runtime.install_runtime(encoder)
    assert current is not None
    yield current
    runtime.install_runtime(None)


def prompts_of(encoder: encoder_module.SentenceTransformerEncoder) -> list[str]:
    return sorted({"", *encoder.prompts.values()})[:2]


def test_it_embeds_exactly_what_sentence_transformers_encode_gives(
    encoder: encoder_module.SentenceTransformerEncoder,
) -> None:
    for prompt in prompts_of(encoder):
        ours = encoder.encode_tokenized(encoder.tokenize(TEXTS, prompt=prompt).inputs, prompt)
        assert ours.dtype == np.float32
        assert cosines(ours, reference(encoder, TEXTS, prompt)).min() >= 0.9999


def test_it_reads_the_same_token_ids_as_sentence_transformers(
    encoder: encoder_module.SentenceTransformerEncoder,
) -> None:
    for prompt in prompts_of(encoder):
        features = encoder.model.preprocess(TEXTS, prompt=prompt or None)
        tokenized = encoder.tokenize(TEXTS, prompt=prompt)
        for row, ids, mask in zip(
            tokenized.inputs, features["input_ids"], features["attention_mask"], strict=True
        ):
            assert row == ids[mask.bool()].tolist()
        assert tokenized.token_counts == features["attention_mask"].sum(dim=1).tolist()
        assert tokenized.truncated == [False, False, False, False, True]


@pytest.mark.parametrize("side", ["right", "left"])
def test_it_pads_a_batch_as_sentence_transformers_does_on_either_side(
    encoder: encoder_module.SentenceTransformerEncoder,
    side: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(encoder.model.tokenizer, "padding_side", side)
    texts = TEXTS[:4]  # under the limit: preprocess pads without truncating
    features = encoder._features(encoder.tokenize(texts, prompt="").inputs, "")
    theirs = encoder.model.preprocess(texts)
    assert features["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert features["attention_mask"].tolist() == theirs["attention_mask"].tolist()


def test_it_keeps_matryoshka_truncation_as_encode_does(
    encoder: encoder_module.SentenceTransformerEncoder,
) -> None:
    with encoder.model.truncate_embeddings(32):
        ours = encoder.encode_tokenized(encoder.tokenize(TEXTS, prompt="").inputs, "")
        theirs = reference(encoder, TEXTS, "")
    assert ours.shape == theirs.shape == (len(TEXTS), 32)
    assert cosines(ours, theirs).min() >= 0.9999


def test_it_tokenizes_each_text_once(run: runtime.Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = run.encoder
    assert isinstance(encoder, encoder_module.SentenceTransformerEncoder)
    prompt = prompts_of(encoder)[-1]
    run.embed(run.tokenize(["warm the prompt up"], prompt=prompt))
    seen: list[list[str]] = []
    original = encoder._tokenizer_ids

    def counting(texts: list[str], **kwargs: Any) -> Any:
        seen.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "_tokenizer_ids", counting)
    vectors = run.embed(run.tokenize(TEXTS, prompt=prompt))
    assert vectors.shape[0] == len(TEXTS)
    assert len(seen) == 1, "texts were tokenized more than once"
    assert len(seen[0]) == len(TEXTS)


TOKENIZER_EDGE_CASES = [
    "hello world",
    "",
    "   spaced\tout\n\nlines  ",
    "Ünïcödé, 한국어 문장, emoji 🙂 and CJK 中文",
    "[CLS] <bos> <pad> [SEP] special-looking text <eos>",
]


@pytest.mark.parametrize(
    "texts",
    [
        pytest.param(TOKENIZER_EDGE_CASES, id="one by one, holding the GIL"),
        pytest.param(
            [*TEXTS, *TOKENIZER_EDGE_CASES, "x" * 3000], id="in a batch, letting the GIL go"
        ),
    ],
)
def test_it_reads_the_ids_and_special_tokens_transformers_tokenizer_gives(
    encoder: encoder_module.SentenceTransformerEncoder, texts: list[str]
) -> None:
    holds_the_gil = sum(map(len, texts)) <= encoder_module.TOKENIZE_HOLDING_GIL_CHARS
    assert holds_the_gil == (len(texts) == len(TOKENIZER_EDGE_CASES))
    assert encoder._rust_tokenizer is not None
    ours = encoder._tokenizer_ids(texts, with_special_mask=True)
    theirs = encoder.model.tokenizer(
        texts,
        add_special_tokens=True,
        truncation=False,
        padding=False,
        return_special_tokens_mask=True,
        verbose=False,
    )
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["special_tokens_mask"] == theirs["special_tokens_mask"]
    if not holds_the_gil:
        # Never truncated here: the long text keeps more tokens than the model reads.
        assert max(len(row) for row in ours["input_ids"]) > encoder.max_seq_length


def test_it_cuts_a_huge_text_to_its_character_budget_before_tokenizing(
    encoder: encoder_module.SentenceTransformerEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = "Tenants share one model. " * 42_000  # about 1 MB
    lengths: list[int] = []
    tokenize = encoder._tokenizer_ids

    def measuring(texts: list[str], **kwargs: Any) -> Any:
        lengths.extend(len(text) for text in texts)
        return tokenize(texts, **kwargs)

    monkeypatch.setattr(encoder, "_tokenizer_ids", measuring)
    tokenized = encoder.tokenize([huge], prompt="")
    assert max(lengths) <= encoder.char_budget < len(huge) / 10
    assert tokenized.token_counts == [encoder.max_seq_length]
    assert tokenized.truncated == [True]
    assert tokenized.counted_in_full == [False]
    assert tokenized.input_token_counts[0] > encoder.max_seq_length
    # No token the model reads was lost to the cut.
    monkeypatch.undo()
    features = encoder.model.preprocess([huge[:200_000]])
    assert tokenized.inputs[0] == features["input_ids"][0].tolist()


def test_it_loses_no_token_when_the_tokenizer_drops_most_characters(
    encoder: encoder_module.SentenceTransformerEncoder,
) -> None:
    # Whitespace yields no tokens: the first cut holds too few, so the budget grows.
    sparse = ("word" + " " * 300) * 3000
    tokenized = encoder.tokenize([sparse], prompt="")
    features = encoder.model.preprocess([sparse])
    assert tokenized.inputs[0] == features["input_ids"][0].tolist()
    assert tokenized.truncated == [True]


def test_it_truncates_on_the_left_keeping_the_prompt_and_the_end(
    gemma_encoder: encoder_module.SentenceTransformerEncoder,
) -> None:
    prompt = gemma_encoder.prompts["query"]
    text = "beginning " + "middle " * 3000 + "the very end"
    tokenized = gemma_encoder.tokenize([text], prompt=prompt, truncation_direction="left")
    (row,) = tokenized.inputs
    assert len(row) == gemma_encoder.max_seq_length
    decoded = gemma_encoder.model.tokenizer.decode(row, skip_special_tokens=True)
    assert decoded.startswith(prompt.strip())
    assert decoded.endswith("the very end")
    assert "beginning" not in decoded
    tokenizer = gemma_encoder.model.tokenizer
    assert row[0] == tokenizer.bos_token_id
    assert row[-1] == tokenizer.eos_token_id
    right = gemma_encoder.tokenize([text], prompt=prompt).inputs[0]
    assert "beginning" in tokenizer.decode(right)
    assert "the very end" not in tokenizer.decode(right)


def test_it_refuses_an_over_long_input_before_model_work_when_asked_not_to_truncate(
    run: runtime.Runtime,
) -> None:
    limit = run.encoder.max_seq_length
    long_text = "word " * (limit + 10)
    with pytest.raises(encoder_module.InputTooLong) as refused:
        run.tokenize(["fine", long_text], prompt="", truncate=False)
    assert (refused.value.index, refused.value.limit, refused.value.at_least) == (1, limit, False)
    # [attr-defined]: the Encoder protocol hides the real encoder's sentence-transformers model.
    whole = run.encoder.model.tokenizer(long_text, verbose=False)["input_ids"]  # type: ignore[attr-defined]
    assert refused.value.tokens == len(whole) > limit
    with pytest.raises(encoder_module.InputTooLong) as huge:
        run.tokenize(["word " * 200_000], prompt="", truncate=False)
    assert huge.value.at_least
    assert huge.value.tokens > limit
    assert f"at most {limit}" in str(huge.value)
    ok = run.tokenize(["fine"], prompt="", truncate=False)
    assert ok.truncated == [False]


@pytest.mark.django_db
def test_it_charges_a_1_mb_text_the_tokens_it_embedded(
    alice: Person, api: Any, minilm: encoder_module.SentenceTransformerEncoder
) -> None:
    response = api.post(
        "/embed",
        {"text": "Tenants share one model. " * 42_000},
        format="json",
        **alice.client_headers,
    )
    assert response.status_code == 200, response.content
    assert response.json()["usage"]["prompt_tokens"] == minilm.max_seq_length
    row = UsageLog.objects.get(tenant=alice.tenant)
    assert row.tokens == minilm.max_seq_length


@pytest.fixture(scope="module")
def minilm_service(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = start_service(tmp_path_factory.mktemp("runtime"), env={"MODEL_QUANTIZATION": "fp32"})
    yield service
    service.stop()


@pytest.mark.service
@pytest.mark.django_db(transaction=True)
def test_it_answers_a_1_mb_text_quickly_over_http(minilm_service: Service, alice: Person) -> None:
    body = {"text": "Tenants share one model. " * 42_000}
    minilm_service.post("/embed", json={"text": "warm up"}, headers=alice.headers)
    started = time.perf_counter()
    response = minilm_service.post("/embed", json=body, headers=alice.headers, timeout=30)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 256
    # Tokenizing the whole megabyte took 1-4 s of CPU; the cut text takes milliseconds. The
    # bound is loose because this machine is shared; the figure is in bench/rss_plateau.py's output.
    timing = dict(
        part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(",")
    )
    assert float(timing["tokenize"]) < 500, timing
    assert elapsed < 10
