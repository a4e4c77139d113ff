"""A short-lived, per-process memory of who a credential is.

Resolving a Supabase user to its membership, tenant and plan (or an API key to its tenant) is
the largest share of the identity layer's time per request, and its answer rarely changes. For
AUTH_CACHE_SECONDS (default 5) a worker reuses it. A change saved through the ORM (admin, services)
clears this process's memory at once; other workers see it within AUTH_CACHE_SECONDS. Only
positive answers are kept: an unknown user or key always goes to the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from django.conf import settings

T = TypeVar("T")

_MAX_ENTRIES = 10_000
_entries: dict[Hashable, tuple[float, Any]] = {}
_lock = threading.Lock()


def remembered(key: Hashable, load: Callable[[], T | None]) -> T | None:
    """`load()`'s answer for `key`, from memory when it is fresh enough."""
    ttl = settings.AUTH_CACHE_SECONDS
    if ttl <= 0:
        return load()
    now = time.monotonic()
    with _lock:
        entry = _entries.get(key)
    if entry is not None and entry[0] > now:
        return entry[1]
    value = load()
    if value is not None:
        with _lock:
            if len(_entries) >= _MAX_ENTRIES:
                _entries.clear()  # crude, but bounded; a full cache refills in seconds
            _entries[key] = (now + ttl, value)
    return value


def forget_all(**_: Any) -> None:
    """Signal receiver: any saved change to identities, tenants, plans or keys."""
    with _lock:
        _entries.clear()
