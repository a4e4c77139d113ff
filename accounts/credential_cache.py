"""A short-lived, per-process memory of who a credential is.

Resolving a Supabase user to its membership, tenant and plan (or an API key to its tenant) is
the largest share of the identity layer's time per request, and its answer rarely changes. For
AUTH_CACHE_SECONDS (default 5) a worker reuses it. A change saved through the ORM (admin, services)
clears this process's memory at once; other workers see it within AUTH_CACHE_SECONDS. Only
positive answers are kept: an unknown user or key always goes to the database. At most
_MAX_ENTRIES credentials are remembered; beyond that the least recently used one is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar, cast

from django.conf import settings

from embedplatform.ttl_cache import TtlCache

T = TypeVar("T")

_MAX_ENTRIES = 10_000
_entries: TtlCache[Hashable, Any] = TtlCache(
    maxsize=_MAX_ENTRIES, ttl=lambda: settings.AUTH_CACHE_SECONDS
)


def remembered(key: Hashable, load: Callable[[], T | None]) -> T | None:
    """`load()`'s answer for `key`, from memory when it is fresh enough."""
    if settings.AUTH_CACHE_SECONDS <= 0:
        return load()
    known = _entries.get(key)
    if known is not None:
        return cast(T, known)
    value = load()
    if value is not None:
        _entries.put(key, value)
    return value


def forget_all(**_: Any) -> None:
    """Signal receiver: any saved change to identities, tenants, plans or keys."""
    _entries.clear()
