"""The batcher groups concurrent requests into shared forward passes and gives each its rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from embeddings.batching import Batcher, _settle


class RecordingModel:
    """Encodes each text as [len(text), hash-ish], slowly, and remembers every pass."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.passes: list[tuple[list[str], str]] = []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str], prompt: str) -> np.ndarray:
        with self.lock:
            self.passes.append((list(texts), prompt))
        time.sleep(self.delay)
        return np.asarray([[len(prompt + t), sum(map(ord, prompt + t))] for t in texts], np.float32)


def expected(texts: list[str], prompt: str = "") -> np.ndarray:
    return np.asarray([[len(prompt + t), sum(map(ord, prompt + t))] for t in texts], np.float32)


def make(model: RecordingModel, **overrides: float) -> Batcher:
    options = {"max_batch_size": 32, "max_batch_tokens": 10_000, "wait_seconds": 0.01}
    options.update(overrides)
    return Batcher(
        model,
        max_batch_size=int(options["max_batch_size"]),
        max_batch_tokens=int(options["max_batch_tokens"]),
        wait_seconds=float(options["wait_seconds"]),
    )


def submit(batcher: Batcher, texts: list[str], prompt: str = "") -> np.ndarray:
    counts = [len(t.split()) for t in texts]
    return batcher.submit(texts, prompt=prompt, token_counts=counts).result(timeout=10)


def test_it_returns_each_request_its_own_rows_in_order() -> None:
    model = RecordingModel()
    batcher = make(model)
    texts = ["short", "a much longer text with words", "mid size text"]
    np.testing.assert_array_equal(submit(batcher, texts), expected(texts))
    batcher.close()


def test_it_groups_concurrent_requests_into_one_forward_pass() -> None:
    model = RecordingModel(delay=0.05)
    batcher = make(model, wait_seconds=0.05)
    requests = [[f"request {i} text"] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda texts: submit(batcher, texts), requests))
    for texts, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result, expected(texts))
    assert len(model.passes) < 16 / 2, "concurrent requests should share passes"
    assert max(len(texts) for texts, _ in model.passes) > 1
    batcher.close()


def test_it_splits_a_large_request_into_passes_of_at_most_max_batch_size() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, max_batch_size=4)
    texts = [f"text number {i} " + "x " * i for i in range(10)]
    np.testing.assert_array_equal(submit(batcher, texts), expected(texts))
    assert [len(texts) for texts, _ in model.passes] == [4, 4, 2]
    batcher.close()


def test_it_sorts_texts_by_length_so_each_pass_pads_little() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, max_batch_size=2)
    texts = ["a", "b c d e f g", "h", "i j k l m n o p"]
    submit(batcher, texts)
    first_pass = model.passes[0][0]
    assert sorted(first_pass) == sorted(["b c d e f g", "i j k l m n o p"])
    batcher.close()


def test_it_keeps_a_pass_within_the_padded_token_budget() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, max_batch_tokens=10)
    texts = ["one two three four five"] * 5  # 5 tokens each: two fit in 10 padded tokens
    submit(batcher, texts)
    assert all(len(texts) <= 2 for texts, _ in model.passes)
    batcher.close()


def test_it_never_mixes_prompts_in_one_pass() -> None:
    model = RecordingModel(delay=0.05)
    batcher = make(model, wait_seconds=0.05)
    jobs = [(["same text"], "query: " if i % 2 else "doc: ") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: submit(batcher, job[0], job[1]), jobs))
    for (texts, prompt), result in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(result, expected(texts, prompt))
    assert {prompt for _, prompt in model.passes} == {"query: ", "doc: "}
    batcher.close()


def test_it_fails_the_requests_of_a_failed_pass_and_keeps_serving() -> None:
    calls = {"n": 0}

    def flaky(texts: list[str], prompt: str) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model exploded")
        return expected(texts, prompt)

    batcher = Batcher(flaky, max_batch_size=8, max_batch_tokens=1000, wait_seconds=0)
    with pytest.raises(RuntimeError, match="model exploded"):
        submit(batcher, ["first"])
    np.testing.assert_array_equal(submit(batcher, ["second"]), expected(["second"]))
    batcher.close()


def test_it_skips_the_texts_of_a_request_nobody_waits_for() -> None:
    model = RecordingModel(delay=0.2)
    batcher = make(model, max_batch_size=1, wait_seconds=0)
    blocker = batcher.submit(["blocker"], prompt="", token_counts=[1])
    abandoned = batcher.submit(["a", "b", "c"], prompt="", token_counts=[1, 1, 1])
    assert abandoned.cancel()
    blocker.result(timeout=5)
    submit(batcher, ["after"])
    encoded = [text for texts, _ in model.passes for text in texts]
    assert encoded == ["blocker", "after"]
    batcher.close()


def test_it_answers_a_request_that_gave_up_without_dying() -> None:
    # A request that times out cancels its future from its own thread at any moment, also
    # between the batcher's "is it still waiting?" and its answer: that answer must not raise,
    # or the batcher thread dies with the other requests of the pass unanswered.
    gave_up: Future[np.ndarray] = Future()
    assert gave_up.cancel()
    _settle(gave_up, result=np.zeros((1, 2), np.float32))
    _settle(gave_up, exception=RuntimeError("model failed"))
    assert gave_up.cancelled()
