"""The batcher groups concurrent requests into shared forward passes and gives each its rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from embeddings import runtime
from embeddings.batching import Batcher, TooManyTextsInFlight, _settle
from embeddings.vectors import VectorShape
from embedplatform.errors import ModelOverloaded, describe


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
    options = {
        "max_batch_size": 32,
        "max_batch_tokens": 10_000,
        "wait_seconds": 0.01,
        "gather_seconds": 0.0,
        "max_queued_texts": 10_000,
        "max_queued_tokens": 1_000_000,
    }
    options.update(overrides)
    return Batcher(
        model,
        max_batch_size=int(options["max_batch_size"]),
        max_batch_tokens=int(options["max_batch_tokens"]),
        wait_seconds=float(options["wait_seconds"]),
        gather_seconds=float(options["gather_seconds"]),
        max_queued_texts=int(options["max_queued_texts"]),
        max_queued_tokens=int(options["max_queued_tokens"]),
    )


class GatedModel(RecordingModel):
    """Holds every pass until the test opens the gate, so a test can arrange the queue while
    a pass is running."""

    def __init__(self) -> None:
        super().__init__(delay=0)
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, texts: list[str], prompt: str) -> np.ndarray:
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return super().__call__(texts, prompt)


def words(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i} " + "w " * 5 for i in range(count)]


def submit(batcher: Batcher, texts: list[str], prompt: str = "") -> np.ndarray:
    counts = [len(t.split()) for t in texts]
    return batcher.submit(texts, prompt=prompt, token_counts=counts).result(timeout=10)


def announced_request(
    batcher: Batcher, texts: list[str] | None, *, after: float
) -> tuple[threading.Thread, list[np.ndarray]]:
    """A request thread that announces itself at once and `after` seconds later submits `texts`
    (or, with None, leaves without submitting, as a refused request does)."""
    answers: list[np.ndarray] = []
    announced = threading.Event()

    def run() -> None:
        with batcher.expecting():
            announced.set()
            time.sleep(after)
            if texts is not None:
                answers.append(submit(batcher, texts))

    thread = threading.Thread(target=run)
    thread.start()
    assert announced.wait(5)
    return thread, answers


def test_it_holds_a_pass_for_a_request_on_its_way() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, wait_seconds=0, gather_seconds=10)
    on_its_way, answers = announced_request(batcher, ["late"], after=0.3)
    assert submit(batcher, ["early"]).tolist() == expected(["early"]).tolist()
    on_its_way.join(5)
    assert answers[0].tolist() == expected(["late"]).tolist()
    assert [texts for texts, _ in model.passes] == [["early", "late"]], "one pass for both"
    batcher.close()


def test_it_stops_waiting_for_a_request_that_leaves_without_submitting() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, wait_seconds=0, gather_seconds=10)
    refused, _ = announced_request(batcher, None, after=0.2)
    started = time.perf_counter()
    submit(batcher, ["alone"])
    assert time.perf_counter() - started < 5, "the pass waited out gather_seconds"
    refused.join(5)
    assert [texts for texts, _ in model.passes] == [["alone"]]
    batcher.close()


def test_it_wakes_the_model_thread_only_when_its_wait_can_end() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, wait_seconds=0, gather_seconds=10)
    wakes: list[int] = []
    notify = batcher._condition.notify

    def counting(n: int = 1) -> None:
        wakes.append(n)
        notify(n)

    batcher._condition.notify = counting  # type: ignore[method-assign]
    # All three announce at once; they submit 0.1 s apart.
    requests = [
        announced_request(batcher, [name], after=0.1 * (i + 1)) for i, name in enumerate("abc")
    ]
    for thread, _ in requests:
        thread.join(5)

    # The first job (the model thread was idle), then the last announced one; not the middle.
    assert len(wakes) == 2
    assert [answers[0].tolist() for _, answers in requests] == [
        expected([name]).tolist() for name in "abc"
    ]
    assert [texts for texts, _ in model.passes] == [["a", "b", "c"]], "one pass for all"
    batcher.close()


def test_it_does_not_hold_a_request_when_nobody_is_on_the_way() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, wait_seconds=0, gather_seconds=10)
    started = time.perf_counter()
    submit(batcher, ["alone"])
    assert time.perf_counter() - started < 5, "a lone request waited for company"
    with batcher.expecting():  # its own announcement does not hold its own pass
        submit(batcher, ["announced"])
    assert time.perf_counter() - started < 5
    assert len(model.passes) == 2
    batcher.close()


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


def test_it_puts_a_short_request_in_the_pass_right_after_the_running_one() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=4, wait_seconds=0)
    large = batcher.submit(words(16, "a"), prompt="", token_counts=[6] * 16, key="tenant-a")
    assert model.started.wait(5)
    short = batcher.submit(["b0 short"], prompt="", token_counts=[2], key="tenant-b")
    model.gate.set()
    short.result(timeout=10)
    large.result(timeout=10)
    passes = [texts for texts, _ in model.passes]
    assert len(passes) == 5  # 16 texts in passes of 4, plus the short one sharing a pass
    assert all(text.startswith("a") for text in passes[0])
    # Right after the running pass, and in a pass of its own rather than padded out to A's texts.
    assert passes[1] == ["b0 short"], "the short request waited behind more than one pass"
    batcher.close()


def test_it_shares_passes_between_tenants_not_between_their_requests() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=4, wait_seconds=0)
    blocker = batcher.submit(["blocker"], prompt="", token_counts=[1], key="tenant-z")
    assert model.started.wait(5)
    # Tenant A queues three large requests, tenant B one: B gets every other pass, not a
    # quarter of them.
    a_jobs = [
        batcher.submit(words(8, f"a{n}-"), prompt="", token_counts=[6] * 8, key="tenant-a")
        for n in range(3)
    ]
    b_job = batcher.submit(words(8, "b-"), prompt="", token_counts=[6] * 8, key="tenant-b")
    model.gate.set()
    for future in [blocker, *a_jobs, b_job]:
        future.result(timeout=10)
    owners = [{text[0] for text in texts} for texts, _ in model.passes[1:]]
    assert owners[:4] == [{"a"}, {"b"}, {"a"}, {"b"}]
    # Within a tenant its requests take turns too: A's second pass serves its second request.
    assert model.passes[3][0][0].startswith("a1-")
    batcher.close()


def test_it_keeps_a_request_in_one_pass_when_it_fills_it() -> None:
    # Fairness must not cost cross-request batching: 32-text requests still take whole passes
    # one after the other, instead of being sliced across every waiting request.
    model = GatedModel()
    batcher = make(model, max_batch_size=8, wait_seconds=0)
    blocker = batcher.submit(["blocker"], prompt="", token_counts=[1], key="z")
    assert model.started.wait(5)
    jobs = [
        batcher.submit(words(8, f"{n}-"), prompt="", token_counts=[6] * 8, key="k")
        for n in range(3)
    ]
    model.gate.set()
    for future in [blocker, *jobs]:
        future.result(timeout=10)
    later = [texts for texts, _ in model.passes[1:]]
    assert [len(texts) for texts in later] == [8, 8, 8]
    assert [{text.split("-")[0] for text in texts} for texts in later] == [{"0"}, {"1"}, {"2"}]
    batcher.close()


def refusals(reason: str) -> float:
    value = REGISTRY.get_sample_value("embed_batcher_refusals_total", {"reason": reason})
    return value or 0.0


def test_it_refuses_at_once_with_503_and_retry_after_when_the_queue_is_full() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=4, wait_seconds=0, max_queued_texts=10)
    running = batcher.submit(words(6, "a"), prompt="", token_counts=[6] * 6, key="a")
    assert model.started.wait(5)
    queued = batcher.submit(words(4, "b"), prompt="", token_counts=[6] * 4, key="b")
    assert batcher.load() == (10, 60)
    started = time.perf_counter()
    before = refusals("overloaded")
    with pytest.raises(ModelOverloaded) as refused:
        batcher.submit(["c"], prompt="", token_counts=[1], key="c")
    assert time.perf_counter() - started < 1, "a full queue must refuse, not wait"
    assert refusals("overloaded") == before + 1
    status_code, body, headers = describe(refused.value)
    assert status_code == 503
    assert body["error"]["code"] == "model_overloaded"
    assert int(headers["Retry-After"]) >= 1
    model.gate.set()
    running.result(timeout=10)
    queued.result(timeout=10)
    # Served work gives its room back, and the next request gets in.
    assert batcher.load() == (0, 0)
    submit(batcher, ["after"])
    batcher.close()


def test_it_bounds_the_queue_in_padded_tokens_too() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2, wait_seconds=0, max_queued_tokens=100)
    # Sorted longest first and chunked by two, these cost 50 + 50 + 10 + 10 padded tokens.
    running = batcher.submit(["a", "b", "c", "d"], prompt="", token_counts=[50, 10, 40, 5], key="a")
    assert batcher.load() == (4, 120)
    assert model.started.wait(5)
    with pytest.raises(ModelOverloaded):
        batcher.submit(["x"], prompt="", token_counts=[1], key="b")
    model.gate.set()
    running.result(timeout=10)
    batcher.close()


def test_it_caps_the_texts_one_tenant_has_in_flight() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=4, wait_seconds=0)
    first = batcher.submit(words(4, "a"), prompt="", token_counts=[6] * 4, key="a")
    assert model.started.wait(5)
    before = refusals("tenant_share")
    with pytest.raises(TooManyTextsInFlight) as refused:
        batcher.submit(
            words(2, "a"), prompt="", token_counts=[6] * 2, key="a", max_texts_in_flight=5
        )
    assert refusals("tenant_share") == before + 1
    status_code, body, headers = describe(refused.value)
    assert (status_code, body["error"]["code"]) == (429, "too_many_texts_in_flight")
    assert int(headers["Retry-After"]) >= 1
    # Within the cap, and for another tenant, requests still get in.
    within = batcher.submit(["a5"], prompt="", token_counts=[6], key="a", max_texts_in_flight=5)
    other = batcher.submit(words(4, "b"), prompt="", token_counts=[6] * 4, key="b")
    model.gate.set()
    for future in (first, within, other):
        future.result(timeout=10)
    batcher.close()


def test_it_lets_one_tenant_hold_at_most_half_the_queue() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=4, wait_seconds=0, max_queued_texts=20)
    first = batcher.submit(words(8, "a"), prompt="", token_counts=[6] * 8, key="a")
    assert model.started.wait(5)
    with pytest.raises(TooManyTextsInFlight):
        batcher.submit(words(3, "a"), prompt="", token_counts=[6] * 3, key="a")
    # The other half stays for everyone else.
    other = batcher.submit(words(10, "b"), prompt="", token_counts=[6] * 10, key="b")
    model.gate.set()
    first.result(timeout=10)
    other.result(timeout=10)
    batcher.close()


def test_it_admits_a_request_larger_than_the_queue_when_its_tenant_has_nothing_waiting() -> None:
    model = RecordingModel(delay=0)
    batcher = make(model, max_batch_size=4, max_queued_texts=3)
    texts = words(8, "a")
    np.testing.assert_array_equal(submit(batcher, texts), expected(texts))
    assert batcher.load() == (0, 0)
    batcher.close()


def test_it_gives_back_the_room_of_a_request_that_gave_up() -> None:
    model = GatedModel()
    batcher = make(model, max_batch_size=2, wait_seconds=0)
    blocker = batcher.submit(["blocker"], prompt="", token_counts=[1], key="z")
    assert model.started.wait(5)
    abandoned = batcher.submit(words(6, "a"), prompt="", token_counts=[6] * 6, key="a")
    assert batcher.load("a") == (6, 36)
    assert abandoned.cancel()
    model.gate.set()
    blocker.result(timeout=10)
    submit(batcher, ["after"])
    assert batcher.load() == (0, 0)
    assert batcher.load("a") == (0, 0)
    batcher.close()


@pytest.mark.django_db
def test_it_answers_503_model_overloaded_with_retry_after_and_charges_nothing(
    fake_encoder: Any, alice: Any, api: Any, settings: Any
) -> None:
    from accounts.models import UsageLog

    settings.BATCH_QUEUE_MAX_TEXTS = 2
    gate = threading.Event()
    encode = fake_encoder.encode_tokenized

    def held(inputs: list[str], prompt: str) -> np.ndarray:
        assert gate.wait(10)
        vectors: np.ndarray = encode(inputs, prompt)
        return vectors

    fake_encoder.encode_tokenized = held
    current = runtime.install_runtime(fake_encoder)
    assert current is not None
    try:
        busy = current.batcher.submit(["x", "y"], prompt="", token_counts=[3, 3], key="other")
        started = time.perf_counter()
        response = api.post("/embed", {"text": "hello"}, format="json", headers=alice.headers)
        assert time.perf_counter() - started < 5
    finally:
        gate.set()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_overloaded"
    assert int(response["Retry-After"]) >= 1
    busy.result(timeout=10)
    row = UsageLog.objects.get(tenant=alice.tenant)
    assert (row.status_code, row.tokens) == (503, 0)


def test_it_shapes_each_requests_rows_as_it_asked_in_a_shared_pass() -> None:
    model = GatedModel()
    batcher = make(model, wait_seconds=0)
    texts = ["first", "second", "third"]
    blocker = batcher.submit(["blocker"], prompt="", token_counts=[1])
    assert model.started.wait(5)
    unit = VectorShape(dimensions=2, normalize=True)
    cut = VectorShape(dimensions=1, normalize=False)
    futures = [
        batcher.submit([text], prompt="", token_counts=[1], shape=shape)
        for text, shape in zip(texts, [unit, cut, None], strict=True)
    ]
    model.gate.set()  # the three wait for the blocker's pass, then share one

    as_unit, as_cut, as_made = (future.result(timeout=10) for future in futures)
    blocker.result(timeout=10)

    assert [passed for passed, _ in model.passes] == [["blocker"], texts]
    raw = expected(texts)
    np.testing.assert_allclose(as_unit, raw[:1] / np.linalg.norm(raw[0]), rtol=1e-6)
    np.testing.assert_array_equal(as_cut, raw[1:2, :1])
    np.testing.assert_array_equal(as_made, raw[2:3])
    batcher.close()
