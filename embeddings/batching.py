"""Cross-request batching: concurrent requests of one worker share forward passes, fairly.

Request threads submit their inputs and wait on a future; one model thread runs forward passes of
at most `max_batch_size` inputs and `max_batch_tokens` padded tokens, all with the same prompt,
and hands each request its own rows back. Before a pass that is not full the model waits
`wait_seconds` for company, and up to `gather_seconds` while requests that announced themselves
(`expecting`: received, still being authenticated and metered) are on their way: a pass has a
large fixed cost (per-op dispatch), so a request arriving a few milliseconds later is far cheaper
in this pass than in a pass of its own, and a request with no one on its way is not held back.

Fairness. Each pass is filled in least-recently-served order: first by key (the tenant), then by
job within a key. A job that got texts in a pass goes behind every job that did not, so a request
arriving while someone's 256-text request runs is in the very next pass: it waits for at most
the pass already running. Within its turn a job fills the pass greedily, longest texts first (so
chunks of a large request pad little), which keeps passes as full as strict arrival order did. A
pass that starts with a request not served yet takes only such requests, so a short request is
not padded out to (and slowed by) someone else's long texts.

Bounds. The texts and padded tokens not yet encoded are bounded per worker; a request that would
overflow them is refused at once (`ModelOverloaded`: 503 with Retry-After) rather than queued for
a wait the client would give up on. One key may hold at most half of either bound, or a cap of
its own (`max_texts_in_flight`, from the plan), so no tenant can fill the queue for the others
(`TooManyTextsInFlight`: 429). A request always gets in when its key has nothing in flight, so an
allowed request is never refused for its size alone.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embeddings.vectors import VectorShape
from embedplatform import metrics
from embedplatform.errors import ModelOverloaded, RateLimitExceeded

# The model reads a list of inputs (token ids for the real model) under one prompt.
EncodeFn = Callable[[list[Any], str], np.ndarray]

# The share of each queue bound one key may hold when it has no cap of its own.
KEY_SHARE = 0.5
# Retry-After when no pass has been timed yet, and the most it ever says.
DEFAULT_RETRY_SECONDS = 1
MAX_RETRY_SECONDS = 60


class TooManyTextsInFlight(RateLimitExceeded):
    """A tenant holds its share of this worker's queue already (429, with Retry-After)."""


@dataclass
class _Job:
    inputs: Sequence[Any]
    prompt: str
    key: str
    token_counts: list[int]
    # What each input costs the queue: the padded length of its chunk had the job run alone.
    costs: list[int]
    future: Future[np.ndarray]
    enqueued_at: float
    sequence: int
    shape: VectorShape | None
    # Indices still to encode, longest first so that chunks of a large request pad little.
    pending: deque[int] = field(default_factory=deque)
    rows: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    served_pass: int = -1  # the last pass this job had texts in; -1: none yet


@dataclass
class _Load:
    """Texts and padded tokens submitted and not yet encoded."""

    texts: int = 0
    tokens: int = 0

    def add(self, texts: int, tokens: int) -> None:
        self.texts += texts
        self.tokens += tokens


class Batcher:
    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        wait_seconds: float,
        gather_seconds: float = 0.0,
        max_queued_texts: int = 1024,
        max_queued_tokens: int = 131_072,
    ) -> None:
        self._encode = encode
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.wait_seconds = max(0.0, wait_seconds)
        self.gather_seconds = max(0.0, gather_seconds)
        # Requests announced by `expecting` that have not submitted yet; which thread announced
        # is thread-local, because a request runs on one thread from arrival to answer.
        self._expected = 0
        self._announced = threading.local()
        self.max_queued_texts = max(1, max_queued_texts)
        self.max_queued_tokens = max(1, max_queued_tokens)
        self._queue: list[_Job] = []
        self._load = _Load()
        self._load_by_key: dict[str, _Load] = {}
        self._key_served: dict[str, int] = {}
        self._passes = 0
        self._sequence = itertools.count()
        # Padded tokens per second, a moving average over passes: what Retry-After is made of.
        self._tokens_per_second = 0.0
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._owner_pid = 0
        self._closed = False

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Announces, for the duration of a request on this thread, that it will probably
        submit: the model may wait for it (up to `gather_seconds`) before a pass that is not
        full. Its `submit` ends the announcement, and so does leaving without one (a refusal)."""
        with self._condition:
            self._expected += 1
        self._announced.pending = True
        try:
            yield
        finally:
            if getattr(self._announced, "pending", False):  # no submit: the model must not wait
                with self._condition:
                    self._end_announcement()
                    self._wake_if_it_matters(was_idle=False)

    def _end_announcement(self) -> None:
        """Called with the lock held: this thread's request is no longer on its way."""
        if getattr(self._announced, "pending", False):
            self._announced.pending = False
            self._expected -= 1

    def submit(
        self,
        inputs: Sequence[Any],
        *,
        prompt: str,
        token_counts: list[int],
        key: str = "",
        max_texts_in_flight: int | None = None,
        shape: VectorShape | None = None,
    ) -> Future[np.ndarray]:
        """Queues `inputs` (one row each, shaped as `shape` asks; None: as the model made it)
        for the model; raises `ModelOverloaded` or `TooManyTextsInFlight` at once when they do
        not fit."""
        future: Future[np.ndarray] = Future()
        if not inputs:
            future.set_result(np.zeros((0, 0), dtype=np.float32))
            return future
        order = sorted(range(len(inputs)), key=lambda i: -token_counts[i])
        costs = [0] * len(inputs)
        for rank, index in enumerate(order):
            costs[index] = max(1, token_counts[order[rank - rank % self.max_batch_size]])
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._admit(key, texts=len(inputs), tokens=sum(costs), cap=max_texts_in_flight)
            job = _Job(
                inputs=inputs,
                prompt=prompt,
                key=key,
                token_counts=token_counts,
                costs=costs,
                future=future,
                enqueued_at=time.perf_counter(),
                sequence=next(self._sequence),
                shape=shape,
                pending=deque(order),
                rows=[None] * len(inputs),
                remaining=len(inputs),
            )
            was_idle = not self._queue
            self._end_announcement()
            self._ensure_thread()
            self._queue.append(job)
            self._account(job, texts=len(inputs), tokens=sum(costs))
            self._wake_if_it_matters(was_idle=was_idle)
        return future

    def _wake_if_it_matters(self, *, was_idle: bool) -> None:
        """Called with the lock held, after a job arrived or an announced one will not come.
        The model thread waits for a first job, and then (`_gather`) for a full pass or for
        the last announced request: only those end its wait. Waking it for anything else costs
        it and the waker a turn of the GIL each, for nothing (about one wake-up a request)."""
        if was_idle or self._expected == 0 or self._queued_texts() >= self.max_batch_size:
            self._condition.notify()

    def load(self, key: str | None = None) -> tuple[int, int]:
        """(texts, padded tokens) not yet encoded: all of them, or one key's."""
        with self._condition:
            load = self._load if key is None else self._load_by_key.get(key, _Load())
            return load.texts, load.tokens

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _admit(self, key: str, *, texts: int, tokens: int, cap: int | None) -> None:
        """Called with the lock held: refuses work that would overflow the bounds."""
        mine = self._load_by_key.get(key)
        if mine is None or mine.texts == 0:
            # A key with nothing in flight always gets in: no request is refused for its size
            # alone, and the overshoot is bounded by the largest request allowed.
            if self._load.texts and (
                self._load.texts >= self.max_queued_texts
                or self._load.tokens >= self.max_queued_tokens
            ):
                self._refuse_overloaded()
            return
        if (
            self._load.texts + texts > self.max_queued_texts
            or self._load.tokens + tokens > self.max_queued_tokens
        ):
            self._refuse_overloaded()
        key_texts = math.floor(self.max_queued_texts * KEY_SHARE)
        if cap is not None:
            key_texts = min(key_texts, max(1, cap))
        key_tokens = math.floor(self.max_queued_tokens * KEY_SHARE)
        if mine.texts + texts > key_texts or mine.tokens + tokens > key_tokens:
            metrics.BATCHER_REFUSALS.labels(reason="tenant_share").inc()
            raise TooManyTextsInFlight(
                f"This tenant already has {mine.texts} texts waiting for the model on this "
                f"server; at most {key_texts} may wait at once. Retry shortly, or send fewer "
                "requests at a time.",
                code="too_many_texts_in_flight",
                headers={"Retry-After": str(self._retry_after(mine.tokens))},
            )

    def _refuse_overloaded(self) -> None:
        metrics.BATCHER_REFUSALS.labels(reason="overloaded").inc()
        raise ModelOverloaded(
            "The model is overloaded; try again shortly.",
            retry_after=self._retry_after(self._load.tokens),
        )

    def _retry_after(self, tokens: int) -> int:
        """Whole seconds until `tokens` padded tokens are encoded, at the recent pace."""
        if self._tokens_per_second <= 0:
            return DEFAULT_RETRY_SECONDS
        seconds = math.ceil(tokens / self._tokens_per_second)
        return max(1, min(MAX_RETRY_SECONDS, seconds))

    def _account(self, job: _Job, *, texts: int, tokens: int) -> None:
        """Called with the lock held: `texts` of `job` (costing `tokens`) joined or left."""
        self._load.add(texts, tokens)
        mine = self._load_by_key.setdefault(job.key, _Load())
        mine.add(texts, tokens)
        if mine.texts <= 0:
            del self._load_by_key[job.key]

    def _ensure_thread(self) -> None:
        # A thread does not survive fork: a process that inherited a batcher starts its own.
        if self._thread is None or self._owner_pid != os.getpid() or not self._thread.is_alive():
            self._owner_pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
            self._thread.start()

    def _queued_texts(self) -> int:
        return sum(len(job.pending) for job in self._queue)

    def _drop_answered(self) -> None:
        """Called with the lock held: jobs already answered (failed, or abandoned by a request
        that timed out) leave the queue and give their share back."""
        kept = []
        for job in self._queue:
            if job.future.done():
                self._account(
                    job, texts=-len(job.pending), tokens=-sum(job.costs[i] for i in job.pending)
                )
                job.pending.clear()
            else:
                kept.append(job)
        self._queue = kept

    def _serving_order(self) -> list[_Job]:
        """Least recently served key first, then least recently served job within it; never
        served ones in arrival order."""
        by_key: dict[str, list[_Job]] = {}
        for job in sorted(self._queue, key=lambda job: (job.served_pass, job.sequence)):
            by_key.setdefault(job.key, []).append(job)
        keys = sorted(
            by_key, key=lambda key: (self._key_served.get(key, -1), by_key[key][0].sequence)
        )
        return [job for key in keys for job in by_key[key]]

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """Called with the lock held: the next forward pass's (job, index) pairs."""
        self._drop_answered()
        if not self._queue:
            return []
        order = self._serving_order()
        prompt = order[0].prompt
        # A pass that starts with a request not served yet takes only such requests: a short
        # request then runs in a short pass of its own, not padded out with someone else's long
        # texts, and is answered right after the pass that was running when it arrived.
        newcomers_only = order[0].served_pass < 0
        batch: list[tuple[_Job, int]] = []
        longest = 0
        full = False
        for job in order:
            if job.prompt != prompt or (newcomers_only and job.served_pass >= 0):
                continue
            while job.pending and not full:
                index = job.pending[0]
                tokens = max(1, job.token_counts[index])
                # Padded size of the pass if this text joins it; the first text always goes.
                padded = max(longest, tokens) * (len(batch) + 1)
                if batch and (len(batch) >= self.max_batch_size or padded > self.max_batch_tokens):
                    full = True
                    break
                job.pending.popleft()
                longest = max(longest, tokens)
                batch.append((job, index))
            if full:
                break
        self._passes += 1
        for job, _ in batch:
            job.served_pass = self._passes
            self._key_served[job.key] = self._passes
        self._queue = [job for job in self._queue if job.pending]
        live_keys = {job.key for job in self._queue} | set(self._load_by_key)
        self._key_served = {k: v for k, v in self._key_served.items() if k in live_keys}
        return batch

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if self._closed and not self._queue:
                    return
                self._gather()
                batch = self._take_batch()
            if batch:
                self._process(batch)

    def _gather(self) -> None:
        """Called with the lock held: waits for company before a pass that is not full, for
        `wait_seconds`, and for up to `gather_seconds` while announced requests are on their
        way."""
        if not (self.wait_seconds or self.gather_seconds):
            return
        started = time.perf_counter()
        while self._queue and self._queued_texts() < self.max_batch_size and not self._closed:
            limit = max(self.wait_seconds, self.gather_seconds if self._expected > 0 else 0.0)
            left = started + limit - time.perf_counter()
            if left <= 0:
                return
            self._condition.wait(left)

    def _process(self, batch: list[tuple[_Job, int]]) -> None:
        started = time.perf_counter()
        for job in {id(job): job for job, _ in batch}.values():
            if job.remaining == len(job.inputs):  # the job's first pass
                metrics.QUEUE_WAIT.observe(started - job.enqueued_at)
        metrics.BATCH_SIZE.observe(len(batch))
        error: BaseException | None = None
        vectors: np.ndarray | list[np.ndarray] | None = None
        try:
            encoded = self._encode([job.inputs[i] for job, i in batch], batch[0][0].prompt)
            vectors = _shaped(batch, encoded)
        except BaseException as exc:  # a failed pass fails the requests in it, not the thread
            error = exc
        elapsed = time.perf_counter() - started
        padded = len(batch) * max(max(1, job.token_counts[i]) for job, i in batch)
        with self._condition:
            for job, index in batch:
                self._account(job, texts=-1, tokens=-job.costs[index])
            if error is None and elapsed > 0:
                pace = padded / elapsed
                self._tokens_per_second = (
                    pace
                    if self._tokens_per_second <= 0
                    else 0.8 * self._tokens_per_second + 0.2 * pace
                )
        if error is not None or vectors is None:
            for job, _ in batch:
                _settle(job.future, exception=error or RuntimeError("the model returned nothing"))
            return
        for (job, index), row in zip(batch, vectors, strict=True):
            if job.future.done():
                continue
            job.rows[index] = row
            job.remaining -= 1
            if job.remaining == 0:
                # [arg-type]: rows are Optional until filled; remaining == 0 says all are.
                _settle(job.future, result=np.stack(job.rows))  # type: ignore[arg-type]


def _shaped(batch: list[tuple[_Job, int]], vectors: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """Each row of a pass as its job asked (`VectorShape`): one array operation per shape
    asked for in the pass, usually one."""
    places: dict[VectorShape | None, list[int]] = {}
    for place, (job, _) in enumerate(batch):
        places.setdefault(job.shape, []).append(place)
    if len(places) == 1:
        (shape,) = places
        return vectors if shape is None else shape.apply(vectors)
    rows: list[np.ndarray] = [vectors[0]] * len(batch)
    for shape, where in places.items():
        part = vectors[where] if shape is None else shape.apply(vectors[where])
        for place, row in zip(where, part, strict=True):
            rows[place] = row
    return rows


def _settle(
    future: Future[np.ndarray],
    *,
    result: np.ndarray | None = None,
    exception: BaseException | None = None,
) -> None:
    """Answers a request, unless it gave up meanwhile: a request that timed out cancels its
    future from its own thread at any moment, and answering a cancelled future raises."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            assert result is not None  # callers give a result or an exception
            future.set_result(result)
    except InvalidStateError:
        pass
