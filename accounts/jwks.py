"""The Supabase project's public signing keys (its JWKS), fetched over HTTP and cached.

Supabase publishes the public half of its asymmetric signing keys (ES256, RS256) at
`<SUPABASE_URL>/auth/v1/.well-known/jwks.json`. Tokens name their key by `kid`.

PyJWT's `PyJWKClient` does the caching: the key set lives for SUPABASE_JWKS_CACHE_SECONDS (never
more than ten minutes), one fetch runs at a time under its lock, and a `kid` the set does not
know refetches at most once every SUPABASE_JWKS_REFETCH_SECONDS (its cooldown), so that a key
rotation is picked up without a restart while made-up `kid`s cannot flood Supabase with requests.
`SupabaseJwksClient` adds what PyJWT leaves out: a size cap on the document, a filter that trusts
only asymmetric signature keys, a back-off after a failed fetch, and an injectable clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from http.client import HTTPException
from typing import Any

import jwt as pyjwt
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from jwt.api_jwk import PyJWTSetWithTimestamp
from jwt.jwk_set_cache import JWKSetCache

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

Clock = Callable[[], float]


class JwksUnavailable(Exception):
    """No fresh key set could be had: the JWKS endpoint failed and the cache is empty or expired."""


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


class VettedKeySet(pyjwt.PyJWKSet):
    """A `PyJWKSet` of keys `parse_jwks` accepted. Unlike PyJWT's own it may be empty, which is
    what a project still on the legacy secret publishes."""

    def __init__(self, keys: dict[str, pyjwt.PyJWK]) -> None:  # no super(): the keys are parsed
        self.keys = list(keys.values())


class _ClockedJwkSetCache(JWKSetCache):
    """PyJWT's key-set cache, aged by the client's clock rather than `time.monotonic`."""

    def __init__(self, lifespan: float, clock: Clock) -> None:
        super().__init__(lifespan)
        self.clock = clock

    def put(self, jwk_set: Any) -> None:
        if not isinstance(jwk_set, pyjwt.PyJWKSet):
            super().put(jwk_set)  # None clears; a raw document is parsed by PyJWT
            return
        stamped = PyJWTSetWithTimestamp(jwk_set)
        stamped.timestamp = self.clock()
        # One assignment: lock-free readers see the old set or the new one, never a mix.
        self.jwk_set_with_timestamp = stamped

    def is_expired(self) -> bool:
        stamped = self.jwk_set_with_timestamp
        return stamped is not None and self.clock() > stamped.get_timestamp() + self.lifespan


class SupabaseJwksClient(pyjwt.PyJWKClient):
    """`PyJWKClient` for a Supabase project's JWKS; see the module docstring for what it adds."""

    def __init__(
        self,
        *,
        url: str,
        max_age: float,
        refetch_interval: float,
        timeout: float,
        apikey: str = "",
        clock: Clock = time.monotonic,
    ) -> None:
        headers = {"Accept": "application/json", "User-Agent": "embedplatform-jwks"}
        if apikey:
            # Harmless where the endpoint is public; needed behind gateways that want the anon key.
            headers["apikey"] = apikey
        super().__init__(
            url,
            lifespan=max_age,
            cooldown_duration=refetch_interval,
            headers=headers,
            timeout=timeout,
        )
        self.clock = clock
        # The cache reads the clock through the client, so that replacing `clock` moves both.
        self.jwk_set_cache = _ClockedJwkSetCache(max_age, lambda: self.clock())
        self._last_attempt = float("-inf")
        self._last_failure = float("-inf")

    def fetch_data(self) -> VettedKeySet:
        """The vetted key set, fetched now; PyJWKClientConnectionError when it cannot be."""
        now = self.clock()
        if now - self._last_failure < FAILURE_BACKOFF_SECONDS:
            raise pyjwt.PyJWKClientConnectionError("the keys could not be fetched moments ago")
        self._last_attempt = now
        request = urllib.request.Request(self.uri, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("the JWKS document is too large")
            keys = parse_jwks(json.loads(body))
        except (OSError, ValueError, HTTPException) as exc:  # URLError and timeouts are OSErrors
            self._last_failure = self.clock()
            logger.warning(
                "jwks_fetch_failed",
                extra={"url": self.uri, "error": f"{type(exc).__name__}: {exc}"[:200]},
            )
            raise pyjwt.PyJWKClientConnectionError(str(exc)) from exc
        logger.info("jwks_fetched", extra={"url": self.uri, "kids": sorted(keys)})
        return VettedKeySet(keys)

    def get_signing_key(self, kid: str) -> pyjwt.PyJWK:
        """PyJWT's lookup (cached set, then one refetch for an unknown `kid` once the cooldown
        has passed), timed by `clock`. A failed refetch leaves the still-fresh set in charge."""
        with self._client_lock:
            key = self.match_kid(self.get_jwk_set().keys, kid)
            if key is None and self.clock() - self._last_attempt >= self.cooldown_duration:
                # A failed refetch is logged by fetch_data; the kid is then unknown to our keys.
                with contextlib.suppress(pyjwt.PyJWKClientConnectionError):
                    key = self.match_kid(self.get_jwk_set(refresh=True).keys, kid)
            if key is None:
                raise pyjwt.PyJWKClientError(f"no signing key matches kid {kid[:64]!r}")
            return key

    def signing_key(self, kid: str) -> pyjwt.PyJWK | None:
        """The key for `kid`, or None when the project does not publish it.

        Raises JwksUnavailable when keys are needed and none can be fetched."""
        assert self.jwk_set_cache is not None
        # Known keys are served without the lock, so a slow fetch for an unknown kid never
        # holds up tokens signed with a key already in hand.
        cached = self.jwk_set_cache.get()
        if cached is not None and (key := self.match_kid(cached.keys, kid)) is not None:
            return key
        try:
            return self.get_signing_key(kid)
        except pyjwt.PyJWKClientConnectionError as exc:
            raise JwksUnavailable(str(exc)) from exc
        except pyjwt.PyJWKClientError:
            return None


_clients: dict[tuple[Any, ...], SupabaseJwksClient] = {}
_clients_lock = threading.Lock()


def get_jwks_cache() -> SupabaseJwksClient | None:
    """The process's JWKS client for the configured URL; None when none is configured."""
    url = settings.SUPABASE_JWKS_URL
    if not url:
        return None
    config = (
        url,
        # PyJWT wants a lifespan above zero; a second is as good as no cache here.
        max(1, min(settings.SUPABASE_JWKS_CACHE_SECONDS, MAX_JWKS_CACHE_SECONDS)),
        settings.SUPABASE_JWKS_REFETCH_SECONDS,
        settings.SUPABASE_JWKS_TIMEOUT_SECONDS,
        settings.SUPABASE_ANON_KEY,
    )
    client = _clients.get(config)
    if client is None:
        with _clients_lock:
            client = _clients.get(config)
            if client is None:
                client = SupabaseJwksClient(
                    url=url,
                    max_age=float(config[1]),
                    refetch_interval=float(config[2]),
                    timeout=float(config[3]),
                    apikey=str(config[4]),
                )
                _clients.clear()  # a changed configuration retires the old client
                _clients[config] = client
    return client


def clear_jwks_cache() -> None:
    with _clients_lock:
        _clients.clear()


@receiver(setting_changed)
def _forget_keys_on_setting_change(*, setting: str, **kwargs: Any) -> None:
    # Tests change the Supabase settings per test; keys fetched under the old ones must go.
    if setting.startswith("SUPABASE_"):
        clear_jwks_cache()
