"""The Supabase project's public signing keys (its JWKS), fetched over HTTP and cached.

Supabase publishes the public half of its asymmetric signing keys (ES256, RS256) at
`<SUPABASE_URL>/auth/v1/.well-known/jwks.json`. Tokens name their key by `kid`. The key set is
kept in memory for at most SUPABASE_JWKS_CACHE_SECONDS, and never longer than ten minutes; a
token with a `kid` the cache does not know triggers a refetch, at most once every
SUPABASE_JWKS_REFETCH_SECONDS, so that a key rotation is picked up without a restart while a
stream of tokens with made-up `kid`s cannot turn the service into a flood of requests to
Supabase.

Thread-safe for gthread workers: readers take the current key set without a lock (it is replaced
whole, never mutated); one fetch runs at a time, and threads waiting for it reuse its result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt as pyjwt
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

logger = logging.getLogger(__name__)

# The algorithms Supabase signs user tokens with, besides the legacy HS256 secret.
ASYMMETRIC_ALGORITHMS = frozenset({"ES256", "RS256"})
# A real key set is a few kilobytes; anything far bigger is not one.
MAX_JWKS_BYTES = 256 * 1024
# After a failed fetch, requests that need keys fail fast for this long instead of each waiting
# for its own timeout.
FAILURE_BACKOFF_SECONDS = 5.0
MIN_RSA_KEY_BITS = 2048
# However long SUPABASE_JWKS_CACHE_SECONDS asks for: a key the project withdraws (a leaked one)
# must stop verifying tokens within ten minutes.
MAX_JWKS_CACHE_SECONDS = 600


class JwksUnavailable(Exception):
    """No fresh key set could be had: the JWKS endpoint failed and the cache is empty or expired."""


@dataclass(frozen=True)
class KeySet:
    keys: Mapping[str, pyjwt.PyJWK]
    fetched_at: float


def parse_jwks(document: Any) -> dict[str, pyjwt.PyJWK]:
    """The usable verification keys of a JWKS document, by `kid`.

    Skipped: keys without a `kid`; symmetric (`oct`) keys, which must never come from a public
    document; keys for another use or another algorithm than ES256/RS256; RSA keys under 2048
    bits. An empty set is valid: a project on the legacy secret publishes no keys."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS document has no 'keys' list")
    keys: dict[str, pyjwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("kty") not in {"EC", "RSA"}:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        key_ops = entry.get("key_ops")
        if isinstance(key_ops, list) and "verify" not in key_ops:
            continue
        try:
            key = pyjwt.PyJWK(entry)
        except pyjwt.PyJWTError as exc:
            logger.warning(
                "jwks_key_skipped", extra={"kid": kid[:64], "reason": type(exc).__name__}
            )
            continue
        if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
            continue
        if key.algorithm_name == "RS256" and key.key.key_size < MIN_RSA_KEY_BITS:
            continue
        keys[kid] = key
    return keys


def fetch_jwks(*, url: str, timeout: float, apikey: str = "") -> dict[str, pyjwt.PyJWK]:
    if not url.startswith(("https://", "http://")):
        raise ValueError("SUPABASE_JWKS_URL must be an http(s) URL")
    headers = {"Accept": "application/json", "User-Agent": "embedplatform-jwks"}
    if apikey:
        # Harmless where the endpoint is public; needed behind gateways that want the anon key.
        headers["apikey"] = apikey
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError("the JWKS document is too large")
    return parse_jwks(json.loads(body))


class JwksCache:
    def __init__(
        self,
        *,
        url: str,
        max_age: float,
        refetch_interval: float,
        timeout: float,
        apikey: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.max_age = max_age
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self.apikey = apikey
        self.clock = clock
        self.fetches = 0
        self._keyset: KeySet | None = None
        self._last_fetch = float("-inf")
        self._last_failure = float("-inf")
        self._lock = threading.Lock()

    def _fresh(self, keyset: KeySet | None, now: float) -> bool:
        return keyset is not None and now - keyset.fetched_at < self.max_age

    def signing_key(self, kid: str) -> pyjwt.PyJWK | None:
        """The key for `kid`, or None when the project does not publish it.

        Raises JwksUnavailable when keys are needed and none can be fetched."""
        keyset = self._keyset
        if self._fresh(keyset, self.clock()):
            assert keyset is not None
            key = keyset.keys.get(kid)
            if key is not None:
                return key
        return self._refresh_for(kid)

    def _refresh_for(self, kid: str) -> pyjwt.PyJWK | None:
        with self._lock:
            # Another thread may have fetched while this one waited for the lock.
            now = self.clock()
            keyset = self._keyset
            fresh = self._fresh(keyset, now)
            if fresh:
                assert keyset is not None
                if kid in keyset.keys:
                    return keyset.keys[kid]
                if now - self._last_fetch < self.refetch_interval:
                    return None  # an unknown kid, and the keys were fetched moments ago
            elif now - self._last_failure < FAILURE_BACKOFF_SECONDS:
                raise JwksUnavailable("the signing keys could not be fetched moments ago")
            self._last_fetch = now
            self.fetches += 1
            try:
                keys = fetch_jwks(url=self.url, timeout=self.timeout, apikey=self.apikey)
            except (OSError, ValueError, urllib.error.URLError) as exc:
                self._last_failure = self.clock()
                logger.warning(
                    "jwks_fetch_failed",
                    extra={"url": self.url, "error": f"{type(exc).__name__}: {exc}"[:200]},
                )
                if fresh:
                    return None
                raise JwksUnavailable(str(exc)) from exc
            self._keyset = KeySet(keys=MappingProxyType(keys), fetched_at=self.clock())
            logger.info("jwks_fetched", extra={"url": self.url, "kids": sorted(keys)})
            return keys.get(kid)


_caches: dict[tuple[Any, ...], JwksCache] = {}
_caches_lock = threading.Lock()


def get_jwks_cache() -> JwksCache | None:
    """The process's cache for the configured JWKS URL; None when none is configured."""
    url = settings.SUPABASE_JWKS_URL
    if not url:
        return None
    config = (
        url,
        min(settings.SUPABASE_JWKS_CACHE_SECONDS, MAX_JWKS_CACHE_SECONDS),
        settings.SUPABASE_JWKS_REFETCH_SECONDS,
        settings.SUPABASE_JWKS_TIMEOUT_SECONDS,
        settings.SUPABASE_ANON_KEY,
    )
    cache = _caches.get(config)
    if cache is None:
        with _caches_lock:
            cache = _caches.get(config)
            if cache is None:
                cache = JwksCache(
                    url=url,
                    max_age=float(config[1]),
                    refetch_interval=float(config[2]),
                    timeout=float(config[3]),
                    apikey=str(config[4]),
                )
                _caches.clear()  # a changed configuration retires the old cache
                _caches[config] = cache
    return cache


def clear_jwks_cache() -> None:
    with _caches_lock:
        _caches.clear()


@receiver(setting_changed)
def _forget_keys_on_setting_change(*, setting: str, **kwargs: Any) -> None:
    # Tests change the Supabase settings per test; keys fetched under the old ones must go.
    if setting.startswith("SUPABASE_"):
        clear_jwks_cache()
