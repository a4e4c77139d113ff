"""Build the full-size (EmbeddingGemma-300m sized, ~1.2 GB fp32) random model once, for benchmarks.

Not for CI: it takes ~15-60 s and 1.2 GB of disk. Usage::

    .venv/bin/python bench/build_full_gemma.py [PATH] [--force]

PATH defaults to ``.cache/models/gemma-like-full``; an existing model there is kept.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: import the project, not bench/'s own files, by name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.gemma_builder import build_gemma_like_model

DEFAULT_FULL_GEMMA_PATH = Path(".cache/models/gemma-like-full")


def is_built(path: Path) -> bool:
    """A finished build has its weights and module list; a crashed one may lack either."""
    return (path / "model.safetensors").is_file() and (path / "modules.json").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_FULL_GEMMA_PATH)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    path: Path = args.path
    if is_built(path) and not args.force:
        print(f"{path} already built; use --force to rebuild")
        return 0
    if path.exists():
        shutil.rmtree(path)
    started = time.perf_counter()
    build_gemma_like_model(path, size="full", seed=args.seed)
    size_mb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    print(f"built {path} ({size_mb:.0f} MB) in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
