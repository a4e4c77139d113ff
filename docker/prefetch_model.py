"""Downloads the configured hub model into the cache (HF_HOME) before gunicorn starts.

A worker loads its model before it first checks in with gunicorn, so a first start that downloads
1.2 GB inside the worker could outlast the worker timeout and be killed over and over. Done here,
the workers find the files in the cache. A failure is only reported: the worker's own load then
explains it (a gated model without HF_TOKEN, no disk space, no network) and refuses to serve.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Weights in formats sentence-transformers never reads here.
IGNORED = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.gguf"]


def log(level: str, event: str, **fields: object) -> None:
    print(json.dumps({"level": level, "event": event, **fields}), file=sys.stderr, flush=True)


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def main() -> int:
    name = os.environ.get("MODEL_NAME", "").strip()
    if not name or not is_hub_id(name):
        return 0  # the bundled model or a local folder: nothing to download
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return 0
    from huggingface_hub import snapshot_download

    started = time.monotonic()
    try:
        path = snapshot_download(
            repo_id=name,
            # The app hands HF_HOME to sentence-transformers as its cache folder: same layout.
            cache_dir=os.environ.get("HF_HOME") or None,
            token=os.environ.get("HF_TOKEN") or None,
            ignore_patterns=IGNORED,
        )
    except Exception as exc:  # reported, and left to the worker to explain
        log(
            "warning",
            "model_prefetch_failed",
            model=name,
            error=f"{type(exc).__name__}: {exc}"[:500],
        )
        return 0
    log(
        "info",
        "model_prefetched",
        model=name,
        path=path,
        seconds=round(time.monotonic() - started, 1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
