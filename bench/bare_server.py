"""The bare per-request baseline: what a naive implementation of the original service does.

A WSGI app with no framework, no authentication, no limits and no accounting: it parses the JSON
body, calls `model.encode` once per request and answers the vector. bench/service.py runs it
under gunicorn (sync workers) next to the real service, in the same run, as a yardstick.

    BARE_MODEL=... BARE_QUANTIZATION=auto gunicorn -w 2 -b 127.0.0.1:PORT bench.bare_server:app

BARE_MODEL=free answers a constant vector without any model (the framework-free ceiling).
Each worker loads the model as it boots, before it accepts anything, and answers a GET with its
pid (and its torch threads, BARE_TORCH_THREADS, default 1): bench/service.py measures only once
every worker has answered, so no worker is still loading (seconds of CPU) while the clients run.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

_encode: Callable[[list[str]], Any] | None = None


def _load() -> Callable[[list[str]], Any]:
    model = os.environ.get("BARE_MODEL", "")
    if model == "free":
        vector = [0.1] * 384
        return lambda texts: [vector for _ in texts]
    import torch

    from embeddings.encoder import load_encoder

    encoder = load_encoder(
        model_name=model,
        quantization=os.environ.get("BARE_QUANTIZATION", "auto"),
        max_seq_length=2048,
        hf_token=None,
    )
    # After loading, which sizes torch's threads for the service's own workers. With two
    # threads in each of two workers, OpenMP's spinning threads fight over the two cores and
    # every pass slows 5-10x (measured: 20 -> 145-173 ms a 1-text pass).
    torch.set_num_threads(int(os.environ.get("BARE_TORCH_THREADS", "1")))
    return lambda texts: encoder.model.encode(texts, batch_size=len(texts)).tolist()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _encode
    if _encode is None:
        _encode = _load()
    if environ.get("REQUEST_METHOD") == "GET":
        about: dict[str, int] = {"pid": os.getpid()}
        if "torch" in sys.modules:  # a model is loaded (not BARE_MODEL=free)
            about["torch_threads"] = sys.modules["torch"].get_num_threads()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(about).encode()]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    texts = [body["text"]] if "text" in body else list(body.get("texts", []))
    vectors = _encode(texts)
    payload = json.dumps(
        {"embedding": vectors[0]} if "text" in body else {"embeddings": vectors}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [payload]


if os.environ.get("BARE_MODEL"):  # under gunicorn: load while the worker boots
    _encode = _load()
