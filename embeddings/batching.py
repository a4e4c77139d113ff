"""Cross-request batching: concurrent requests of one worker share forward passes.

Request threads submit their texts and wait on a future; one model thread takes queued texts in
arrival order, at most `max_batch_size` texts and `max_batch_tokens` padded tokens at a time, all
with the same prompt, runs them through the model sorted by length (less padding), and hands each
request its own rows back. When the model is idle it waits `wait_seconds` for company before
starting a pass; when it is busy, requests gather by themselves while the current pass runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from embedplatform import metrics

EncodeFn = Callable[[list[str], str], np.ndarray]


@dataclass
class _Job:
    texts: list[str]
    prompt: str
    token_counts: list[int]
    future: Future[np.ndarray]
    enqueued_at: float
    # Indices still to encode, longest first so that chunks of a large request pad little.
    pending: deque[int] = field(default_factory=deque)
    rows: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0


class Batcher:
    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        wait_seconds: float,
    ) -> None:
        self._encode = encode
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.wait_seconds = max(0.0, wait_seconds)
        self._queue: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._owner_pid = 0
        self._closed = False

    def submit(
        self, texts: list[str], *, prompt: str, token_counts: list[int]
    ) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        if not texts:
            future.set_result(np.zeros((0, 0), dtype=np.float32))
            return future
        order = sorted(range(len(texts)), key=lambda i: -token_counts[i])
        job = _Job(
            texts=texts,
            prompt=prompt,
            token_counts=token_counts,
            future=future,
            enqueued_at=time.perf_counter(),
            pending=deque(order),
            rows=[None] * len(texts),
            remaining=len(texts),
        )
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._ensure_thread()
            self._queue.append(job)
            self._condition.notify()
        return future

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def _ensure_thread(self) -> None:
        # A thread does not survive fork: a process that inherited a batcher starts its own.
        if self._thread is None or self._owner_pid != os.getpid() or not self._thread.is_alive():
            self._owner_pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
            self._thread.start()

    def _queued_texts(self) -> int:
        return sum(len(job.pending) for job in self._queue)

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """Called with the lock held: the next forward pass's (job, index) pairs."""
        # Jobs already answered (failed, or abandoned by a request that timed out) drop out.
        self._queue = deque(job for job in self._queue if not job.future.done())
        if not self._queue:
            return []
        prompt = self._queue[0].prompt
        batch: list[tuple[_Job, int]] = []
        longest = 0
        full = False
        for job in self._queue:
            if job.prompt != prompt:
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
        self._queue = deque(job for job in self._queue if job.pending)
        return batch

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if self._closed and not self._queue:
                    return
                if self.wait_seconds and self._queued_texts() < self.max_batch_size:
                    deadline = time.perf_counter() + self.wait_seconds
                    while self._queue and self._queued_texts() < self.max_batch_size:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._condition.wait(left)
                batch = self._take_batch()
            if batch:
                self._process(batch)

    def _process(self, batch: list[tuple[_Job, int]]) -> None:
        started = time.perf_counter()
        for job in {id(job): job for job, _ in batch}.values():
            if job.remaining == len(job.texts):  # the job's first pass
                metrics.QUEUE_WAIT.observe(started - job.enqueued_at)
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            vectors = self._encode([job.texts[i] for job, i in batch], batch[0][0].prompt)
        except BaseException as exc:  # a failed pass fails the requests in it, not the thread
            for job, _ in batch:
                _settle(job.future, exception=exc)
            return
        for (job, index), row in zip(batch, vectors, strict=True):
            if job.future.done():
                continue
            job.rows[index] = row
            job.remaining -= 1
            if job.remaining == 0:
                _settle(job.future, result=np.stack(job.rows))  # type: ignore[arg-type]


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
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass
