"""The embedded default for a bench run: what `scripts/serve.sh` runs without configuration."""

from __future__ import annotations

import os
import tempfile


def use_embedded_default(prefix: str) -> None:
    """Points this process, and the servers it starts, at SQLite in a new temporary DATA_DIR
    and the local cache (no Redis)."""
    data_dir = tempfile.mkdtemp(prefix=prefix)
    os.environ["DATA_DIR"] = data_dir
    os.environ["DATABASE_URL"] = f"sqlite:///{data_dir}/db.sqlite3"
    os.environ["REDIS_URL"] = ""
