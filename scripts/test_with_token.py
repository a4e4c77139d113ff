#!/usr/bin/env python3
"""An integration run against a live embedplatform, with assertions. Python's standard library
only, so it runs anywhere:

    BASE_URL=https://embed.example.com JWT_TOKEN=<token> python3 scripts/test_with_token.py

JWT_TOKEN is a Supabase access token (or a tenant API key). Each check prints one line; the run
exits 1 when any check failed. It spends a few hundred tokens of the tenant's quota.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import sys
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BASE_URL = os.environ.get("BASE_URL", "http://localhost:8000").rstrip("/")
TIMEOUT = float(os.environ.get("TIMEOUT", "60"))


class CheckFailed(Exception):
    pass


def expect(condition: object, detail: object = "") -> None:
    """An assertion that `python -O` cannot strip."""
    if not condition:
        raise CheckFailed(str(detail))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


def call(method: str, path: str, body: Any = None, *, token: str | None = None) -> Answer:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(BASE_URL + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), error.headers
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Answer(status, {k.lower(): v for k, v in got.items()}, parsed)


def token() -> str:
    return os.environ["JWT_TOKEN"]


def served(answer: Answer) -> Any:
    expect(answer.status == 200, f"HTTP {answer.status}: {str(answer.body)[:300]}")
    return answer.body


def embed(text: str, **options: Any) -> list[float]:
    return list(
        served(call("POST", "/embed", {"text": text, **options}, token=token()))["embedding"]
    )


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def expect_error_shape(answer: Answer, status: int, error_type: str) -> None:
    expect(answer.status == status, f"HTTP {answer.status}, wanted {status}: {answer.body}")
    expect(isinstance(answer.body, dict) and set(answer.body) == {"error"}, answer.body)
    error = answer.body["error"]
    expect(set(error) == {"message", "type", "param", "code"}, error)
    expect(error["type"] == error_type, error)
    expect(error["message"], error)


# --- Checks -------------------------------------------------------------------------------------

health: dict[str, Any] = {}


def check_health() -> None:
    body = served(call("GET", "/health"))
    expect(body["status"] == "ok", body)
    expect(isinstance(body["dimensions"], int) and body["dimensions"] > 0, body)
    health.update(body)


def check_dimensions_and_unit_norm() -> None:
    body = served(call("POST", "/embed", {"text": "안녕하세요, 반갑습니다!"}, token=token()))
    dimensions = health.get("dimensions") or body["dimensions"]
    expect(body["dimensions"] == len(body["embedding"]) == dimensions, body["dimensions"])
    expect(abs(norm(body["embedding"]) - 1) < 1e-3, norm(body["embedding"]))
    expect(body["usage"]["total_tokens"] > 0, body["usage"])


def check_batch_keeps_order() -> None:
    texts = ["첫 번째", "두 번째", "세 번째", "The fourth text is in English."]
    body = served(call("POST", "/batch-embed", {"texts": texts}, token=token()))
    expect(len(body["embeddings"]) == len(texts))
    for text, vector in zip(texts, body["embeddings"], strict=True):
        alone = embed(text)
        expect(cosine(vector, alone) > 0.999, f"{text!r} moved in the batch")


def check_similar_sentences_are_closer() -> None:
    cat = embed("The cat sits on the mat.")
    similar = embed("A cat is sitting on a rug.")
    unrelated = embed("Quarterly tax filings are due at the end of April.")
    expect(
        cosine(cat, similar) > cosine(cat, unrelated) + 0.1,
        (
            cosine(cat, similar),
            cosine(cat, unrelated),
        ),
    )


def check_matryoshka_dimensions() -> None:
    full = embed("Matryoshka dolls nest inside each other.")
    native = len(full)
    sizes = [size for size in (512, 256, 128) if size < native] or [native // 2]
    for size in sizes:
        short = embed("Matryoshka dolls nest inside each other.", dimensions=size)
        expect(len(short) == size, (size, len(short)))
        expect(abs(norm(short) - 1) < 1e-3, norm(short))
        # The first `size` dimensions of the full vector, re-normalised.
        expect(cosine(short, full[:size]) > 0.999, size)


def check_openai_base64_encoding() -> None:
    texts = ["base64 check", "another one"]
    floats = served(
        call("POST", "/v1/embeddings", {"input": texts, "encoding_format": "float"}, token=token())
    )
    packed = served(
        call("POST", "/v1/embeddings", {"input": texts, "encoding_format": "base64"}, token=token())
    )
    expect(floats["object"] == "list" and [d["index"] for d in floats["data"]] == [0, 1])
    for as_floats, as_base64 in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(as_base64["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        expected = as_floats["embedding"]
        expect(len(decoded) == len(expected))
        expect(max(abs(a - b) for a, b in zip(decoded, expected, strict=True)) < 1e-5)
    expect(floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0)


def check_error_shape() -> None:
    expect_error_shape(
        call("POST", "/embed", {"text": ""}, token=token()), 422, "invalid_request_error"
    )
    expect_error_shape(
        call("POST", "/batch-embed", {"texts": "not a list"}, token=token()),
        422,
        "invalid_request_error",
    )
    expect_error_shape(
        call("POST", "/v1/embeddings", {"input": "x", "model": "no-such-model"}, token=token()),
        404,
        "not_found_error",
    )
    expect_error_shape(
        call("POST", "/embed", {"text": "x"}, token="not-a-token"), 401, "authentication_error"
    )


def check_rate_limit_headers() -> None:
    answer = call("POST", "/embed", {"text": "rate limit headers"}, token=token())
    served(answer)
    for name in ("requests", "tokens"):
        limit = int(answer.headers[f"x-ratelimit-limit-{name}"])
        remaining = int(answer.headers[f"x-ratelimit-remaining-{name}"])
        expect(0 <= remaining < limit, (name, remaining, limit))
        expect(answer.headers[f"x-ratelimit-reset-{name}"].endswith("s"))


def check_usage() -> None:
    body = served(call("GET", "/usage", token=token()))
    expect(body["period"]["tokens"] > 0, body["period"])
    expect(body["period"]["remaining_tokens"] >= 0)


CHECKS: list[Callable[[], None]] = [
    check_health,
    check_dimensions_and_unit_norm,
    check_batch_keeps_order,
    check_similar_sentences_are_closer,
    check_matryoshka_dimensions,
    check_openai_base64_encoding,
    check_error_shape,
    check_rate_limit_headers,
    check_usage,
]


def main() -> int:
    if not os.environ.get("JWT_TOKEN"):
        print("Set JWT_TOKEN to a Supabase access token or a tenant API key.", file=sys.stderr)
        return 2
    failures = 0
    for check in CHECKS:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        try:
            check()
        except Exception as exc:
            failures += 1
            detail = str(exc) or traceback.format_exc(limit=1).strip().splitlines()[-1]
            print(f"FAIL  {name}: {type(exc).__name__}: {detail[:400]}")
        else:
            print(f"ok    {name}")
    if failures:
        print(f"summary: {failures} of {len(CHECKS)} checks against {BASE_URL} FAILED")
        return 1
    print(f"summary: all {len(CHECKS)} checks against {BASE_URL} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
