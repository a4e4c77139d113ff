"""Why the embed responses are built by hand (`vectors.tolist()` into a dict) while /usage and
/health are rendered by their serializers: the time to render one response both ways, for the
served model's size, at 1 and 32 texts. Prints figures only; nothing here asserts.

Usage::

    DJANGO_SETTINGS_MODULE=embedplatform.settings python -m bench.response_rendering \\
        [--dimensions 768] [--repeat 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import django


def per_call_ms(render: Callable[[], Any], repeat: int) -> float:
    render()
    started = time.perf_counter()
    for _ in range(repeat):
        render()
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dimensions", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    django.setup()
    import numpy as np

    from embeddings.serializers import BatchEmbedOutputSerializer

    usage = {"prompt_tokens": 12, "total_tokens": 12}
    print(f"{'texts':>5} {'by hand ms':>11} {'serializer ms':>14} {'ratio':>6}")
    for texts in (1, 32):
        vectors = np.random.default_rng(0).standard_normal((texts, args.dimensions), "float32")

        def by_hand(vectors: np.ndarray = vectors) -> dict[str, Any]:
            return {"embeddings": vectors.tolist(), "model": "m", "dimensions": 1, "usage": usage}

        def serialized(vectors: np.ndarray = vectors) -> dict[str, Any]:
            return BatchEmbedOutputSerializer(by_hand(vectors)).data

        hand = per_call_ms(by_hand, args.repeat)
        serializer = per_call_ms(serialized, args.repeat)
        print(f"{texts:>5} {hand:>11.3f} {serializer:>14.3f} {serializer / hand:>6.1f}x")


if __name__ == "__main__":
    main()
