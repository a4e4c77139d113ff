"""Peak and settled memory of loading a model in each MODEL_QUANTIZATION mode.

    .venv/bin/python bench/build_full_gemma.py     # once: the full-size EmbeddingGemma look-alike
    .venv/bin/python bench/load_memory.py [--model PATH_OR_ID] [--modes fp32,bf16,fp16,int8]

Each mode loads in a fresh process, as a gunicorn worker does, through the service's own
``load_quantized_model``. Columns (MiB): ``base`` is the resident set after importing torch,
transformers and sentence-transformers; ``peak`` the process's high-water mark (``VmHWM``) by the
end of loading; ``settled`` the resident set once loading returned, split into private memory
(``anon``) and pages of mapped files (``file``, e.g. a memory-mapped fp32 checkpoint); ``encoded``
after encoding a few sentences. ``peak/settled`` is what a worker needs above what it keeps: two
workers starting together need the sum of their peaks at once. fp32 keeps its weights in the
lazily paged checkpoint mapping, so its ``settled`` grows with use (see ``encoded``).

The default model is ``.cache/models/gemma-like-full`` (built by ``bench/build_full_gemma.py``,
1.2 GB; not for CI). Prints figures only; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: import the project, not bench/'s own files, by name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.build_full_gemma import DEFAULT_FULL_GEMMA_PATH, is_built

ROOT = Path(__file__).resolve().parent.parent
ENCODE_SAMPLE = (
    "The quick brown fox jumps over the lazy dog.",
    "오늘 서울의 날씨는 맑고 최고 기온은 24도입니다.",
    "이번 release에서는 bug fix와 performance 개선이 포함되었습니다.",
    "🚀 Launch day! 🎉🔥",
)


def run_worker(args: argparse.Namespace) -> int:
    """Load one mode in this process and print one ``RESULT`` JSON line."""
    import torch
    from sentence_transformers import SentenceTransformer  # noqa: F401  (counted in base)

    from bench.memory import memory_status_mb
    from embeddings.quantization import load_quantized_model

    torch.set_num_threads(args.threads)
    base = memory_status_mb()
    model, info = load_quantized_model(
        args.model,
        quantization=args.mode,
        token=os.environ.get("HF_TOKEN") or None,
        max_seq_length=None,
    )
    settled = memory_status_mb()
    model.encode(list(ENCODE_SAMPLE), batch_size=len(ENCODE_SAMPLE))
    encoded = memory_status_mb()
    result = {
        "requested": args.mode,
        "mode": info.mode,
        "int8_kernel": info.int8_kernel,
        "load_s": info.load_seconds,
        "weights_mb": info.weight_bytes / 2**20,
        "base_mb": base.get("VmRSS"),
        "peak_mb": settled.get("VmHWM"),
        "settled_mb": settled.get("VmRSS"),
        "settled_anon_mb": settled.get("RssAnon"),
        "settled_file_mb": settled.get("RssFile"),
        "encoded_mb": encoded.get("VmRSS"),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _run_one(model: str, mode: str, threads: int) -> dict[str, Any] | None:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--model",
        model,
        "--mode",
        mode,
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            return result
    print(f"!! {mode} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return None


def format_table(results: list[dict[str, Any]]) -> str:
    header = (
        f"{'mode':<10} {'kernel':<13} {'load s':>6} {'weights':>7} {'base':>6} {'peak':>6} "
        f"{'settled':>7} {'anon':>6} {'file':>6} {'encoded':>7} {'peak-settled':>12} "
        f"{'peak/settled':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        mode = r["mode"] if r["mode"] == r["requested"] else f"{r['requested']}>{r['mode']}"
        lines.append(
            f"{mode:<10} {(r['int8_kernel'] or '-'):<13} {r['load_s']:>6.1f} "
            f"{r['weights_mb']:>7.0f} {r['base_mb']:>6.0f} {r['peak_mb']:>6.0f} "
            f"{r['settled_mb']:>7.0f} {r['settled_anon_mb']:>6.0f} {r['settled_file_mb']:>6.0f} "
            f"{r['encoded_mb']:>7.0f} {r['peak_mb'] - r['settled_mb']:>12.0f} "
            f"{r['peak_mb'] / r['settled_mb']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_FULL_GEMMA_PATH), help="path or hub id")
    parser.add_argument("--modes", default="fp32,bf16,fp16,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)

    model_path = Path(args.model)
    if args.model == str(DEFAULT_FULL_GEMMA_PATH) and not is_built(ROOT / model_path):
        print(f"{model_path} is not built yet: run .venv/bin/python bench/build_full_gemma.py")
        return 1
    model = str(ROOT / model_path) if (ROOT / model_path).exists() else args.model
    print(f"model={args.model} threads={args.threads}; MiB, each mode in a fresh process")
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        print(f".. {mode}", flush=True)
        result = _run_one(model, mode, args.threads)
        if result is not None:
            results.append(result)
    print()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
