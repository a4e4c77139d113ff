"""The model's forward pass, eager against traced (MODEL_TRACE), alone and beside busy threads.

    .venv/bin/python bench/graph.py [--model PATH_OR_ID] [--quantization auto] [--threads 1]
        [--busy 0,4] [--batches 1,8,32] [--seconds 3]

Each row times `encode_tokenized` (the pass the service's model thread runs) on pre-tokenized
short queries, with the backbone eager and then as the traced graph, in one process:

- alone: the per-op dispatch cost that tracing removes;
- beside N Python threads that each run a little pure-Python work and sleep a moment, as request
  threads do between round trips: the eager model thread then waits for the GIL at every op.

"busy work/s" is how much those threads got done meanwhile. The ratio column is eager time over
traced time, measured in the same run. Prints figures only; nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: import the project, not bench/'s own files, by name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "embedplatform.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def busy_python(stop: threading.Event, done: list[int]) -> None:
    """A request thread's rhythm: some Python with the GIL held, then a short wait (I/O)."""
    while not stop.is_set():
        sum(i * i for i in range(2000))
        done[0] += 1
        time.sleep(0.0005)


def time_pass(encoder: Any, inputs: list[Any], *, busy: int, seconds: float) -> tuple[float, float]:
    """Median milliseconds per pass, and the busy threads' work units per second."""
    stop = threading.Event()
    done = [0]
    threads = [threading.Thread(target=busy_python, args=(stop, done)) for _ in range(busy)]
    for thread in threads:
        thread.start()
    try:
        encoder.encode_tokenized(inputs, "")  # warm-up
        durations: list[float] = []
        started = time.perf_counter()
        while len(durations) < 3 or time.perf_counter() - started < seconds:
            begin = time.perf_counter()
            encoder.encode_tokenized(inputs, "")
            durations.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return statistics.median(durations) * 1000, done[0] / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="path or hub id (default: bundled MiniLM)")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (service: 1)")
    parser.add_argument("--busy", default="0,4", help="busy Python threads beside the model")
    parser.add_argument("--batches", default="1,8,32", help="texts per pass")
    parser.add_argument("--seconds", type=float, default=3.0, help="time box per row and graph")
    args = parser.parse_args(argv)

    import django

    django.setup()
    import torch

    from bench.service import short_queries
    from embeddings.encoder import load_encoder

    traced = load_encoder(
        model_name=args.model,
        quantization=args.quantization,
        max_seq_length=2048,
        hf_token=None,
        trace=True,
    )
    torch.set_num_threads(args.threads)
    if traced.traced is None:
        print("the model could not be traced; see the model_graph log line")
        return 1
    eager = replace(traced, traced=None)
    texts = short_queries(64, seed=11)
    print(
        f"model={args.model or traced.name} dtype={traced.dtype} torch threads={args.threads}, "
        "ms per pass (median)"
    )
    print(f"{'texts':>5} {'busy':>4} {'eager':>8} {'traced':>8} {'ratio':>6}  busy work/s")
    for batch in (int(value) for value in args.batches.split(",")):
        inputs = traced.tokenize(texts[:batch], prompt="").inputs
        for busy in (int(value) for value in args.busy.split(",")):
            eager_ms, eager_work = time_pass(eager, inputs, busy=busy, seconds=args.seconds)
            traced_ms, traced_work = time_pass(traced, inputs, busy=busy, seconds=args.seconds)
            work = f"  {eager_work:.0f} -> {traced_work:.0f}" if busy else ""
            print(
                f"{batch:>5} {busy:>4} {eager_ms:8.2f} {traced_ms:8.2f} "
                f"{eager_ms / traced_ms:5.2f}x{work}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
