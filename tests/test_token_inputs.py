"""Token-id input on /v1/embeddings: tiktoken cl100k_base ids by default (OpenAI's meaning),
the served model's own ids with TOKEN_ID_INPUT=native; the encoding file works offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from rest_framework.test import APIClient

from embeddings import token_inputs
from tests.conftest import FakeEncoder, Person
from tests.test_ratelimit import start_log

ROOT = Path(__file__).resolve().parent.parent
# Text of many kinds: scripts, emoji (4-byte UTF-8), combining marks, code, odd whitespace,
# numbers, and text that looks like special tokens.
SAMPLE = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, coöperate, façade",
    "日本語のテキストと中文文本와 한국어",
    "Русский текст и ελληνικά και עברית ועربية",
    "emoji 🚀🔥👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "e\u0301 combining, zero\u200bwidth, nbsp\u00a0here",
    "def add(a, b):\n\treturn a + b  # code\r\n",
    "    leading and trailing spaces   ",
    "1234567890 3.14159 -42 1e10 0x1F",
    "<|endoftext|> is only text here",
    "I'm can't won't they'll we've you're",
    "\n\n\nnewlines\n\n",
    "a" * 500,
]


def post(person: Person, body: dict[str, Any]) -> Any:
    client = APIClient()
    return client.post("/v1/embeddings", body, format="json", **person.client_headers)


def test_it_uses_openais_cl100k_base_file() -> None:
    data = token_inputs.cl100k_file().read_bytes()

    assert hashlib.sha256(data).hexdigest() == token_inputs.CL100K_SHA256
    assert len(data.splitlines()) == token_inputs.CL100K_ORDINARY_TOKENS


def test_it_builds_the_same_encoding_as_tiktoken_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiktoken's own cl100k_base (its pattern and special tokens, from tiktoken_ext), fed the
    same file through its cache, without any download."""
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    token_inputs.install_tiktoken_cache(tmp_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # not one loaded earlier
    official = tiktoken.get_encoding("cl100k_base")
    ours = token_inputs.cl100k()

    assert ours._pat_str == official._pat_str
    assert ours._special_tokens == official._special_tokens
    assert ours.n_vocab == official.n_vocab == 100277
    for text in SAMPLE:
        ids = official.encode(text, disallowed_special=())  # "<|endoftext|>" as plain text
        assert ours.encode(text, disallowed_special=()) == ids, text
        assert ours.decode(ids) == text
    assert ours.encode("<|endoftext|>", allowed_special="all") == [100257]
    # The examples of tiktoken's own documentation.
    assert ours.encode("hello world") == [15339, 1917]
    assert ours.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]


def test_it_embeds_tiktoken_ids_as_the_text_they_encode(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    encoding = token_inputs.cl100k()
    texts = SAMPLE[:8]
    by_ids = post(alice, {"input": [encoding.encode(text) for text in texts]})
    by_text = post(alice, {"input": texts})

    assert by_ids.status_code == 200, by_ids.json()
    assert sorted(fake_encoder.encoded[0]) == sorted(texts)  # exactly the texts, longest first
    for a, b in zip(by_ids.json()["data"], by_text.json()["data"], strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"])
    single = post(alice, {"input": [15339, 1917]}).json()
    assert fake_encoder.encoded[-1] == ["hello world"]
    assert single["usage"]["prompt_tokens"] == 4  # the served model's tokens, not tiktoken's


def test_it_skips_special_tokens_like_the_native_mode_does(
    alice: Person, fake_encoder: FakeEncoder
) -> None:
    response = post(alice, {"input": [[100257, 15339, 1917, 100276]]})

    assert response.status_code == 200
    assert fake_encoder.encoded == [["hello world"]]
    only_special = post(alice, {"input": [[100257]]}).json()["error"]
    assert (only_special["code"], only_special["param"]) == ("empty_text", "input")


@pytest.mark.parametrize("token_id", [100256, 100261, 100275, 100277, 2**40])
def test_it_refuses_ids_that_are_not_cl100k_base_tokens(
    alice: Person, fake_encoder: FakeEncoder, token_id: int
) -> None:
    response = post(alice, {"input": [[15339, token_id]]})

    assert response.status_code == 400  # OpenAI's status for an invalid request
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_token_id", "input")
    assert str(token_id) in error["message"]
    assert "TOKEN_ID_INPUT" in error["message"]
    assert fake_encoder.encoded == []


def test_it_reads_ids_of_the_served_model_in_native_mode(
    alice: Person, fake_encoder: FakeEncoder, settings: Any
) -> None:
    settings.TOKEN_ID_INPUT = "native"

    assert post(alice, {"input": [[15339, 1917]]}).status_code == 400  # over the fake's 1000
    assert post(alice, {"input": [[1, 2]]}).status_code == 200
    assert fake_encoder.encoded == [["t1 t2"]]


def test_it_gives_client_libraries_the_encoding_offline(tmp_path: Path) -> None:
    """What tests/test_clients.py does for langchain-openai: a fresh process with
    TIKTOKEN_CACHE_DIR pointing at the installed file, and every download refused."""
    token_inputs.install_tiktoken_cache(tmp_path)
    code = (
        "import tiktoken, tiktoken.load\n"
        "def refuse(path): raise SystemExit('download attempted: ' + path)\n"
        "tiktoken.load.read_file = refuse\n"
        "print(tiktoken.encoding_for_model('text-embedding-ada-002').encode('hello world'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"TIKTOKEN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[15339, 1917]"


def test_it_refuses_an_encoding_file_that_is_not_the_official_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forged = tmp_path / "cl100k_base.tiktoken"
    forged.write_bytes(token_inputs.cl100k_file().read_bytes().replace(b" 0\n", b" 1\n", 1))
    monkeypatch.setattr(token_inputs, "cl100k_file", lambda: forged)

    with pytest.raises(token_inputs.EncodingFileError, match="sha256"):
        token_inputs.verified_cl100k_bytes()
    (error,) = token_inputs.check_token_id_input()
    assert error.id == "embeddings.E001"
    assert "sha256" in error.msg
    with pytest.raises(SystemCheckError, match="sha256"):
        call_command("check")


def test_it_fails_the_system_check_on_an_unknown_mode(settings: Any) -> None:
    settings.TOKEN_ID_INPUT = "bert"

    (error,) = token_inputs.check_token_id_input()
    assert "TOKEN_ID_INPUT must be one of tiktoken, native" in error.msg


def test_it_passes_the_system_check_in_either_mode(settings: Any) -> None:
    for mode in ("tiktoken", "native", " Native "):
        settings.TOKEN_ID_INPUT = mode
        assert token_inputs.check_token_id_input() == []


@pytest.mark.parametrize(
    ("mode", "expected"), [("tiktoken", '"encoding":"cl100k_base"'), ("native", "served model")]
)
def test_it_says_at_start_which_mode_is_active(mode: str, expected: str, tmp_path: Path) -> None:
    log = start_log(TOKEN_ID_INPUT=mode, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    (line,) = [line for line in log.splitlines() if "token_id_input_mode" in line]

    assert json.loads(line)["mode"] == mode
    assert expected in line


def test_it_does_not_start_with_an_unknown_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
            "EMBEDPLATFORM_SERVING": "1",
            "MODEL_LOAD_ON_START": "false",
            "TOKEN_ID_INPUT": "bert",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "TOKEN_ID_INPUT must be one of tiktoken, native" in result.stderr
