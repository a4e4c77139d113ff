"""Settings for the test run: the project's own, fed by a test environment.

pytest-django imports this before any conftest runs, so this is where the environment is set:
real PostgreSQL and Redis (DATABASE_URL / REDIS_URL override), a cache key prefix of the run's
own so counters of earlier runs never leak in, and throwaway secrets.
"""

import os
import tempfile
import uuid

os.environ.setdefault("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ["CACHE_KEY_PREFIX"] = f"test-{uuid.uuid4().hex[:10]}"
os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="embedplatform-test-data-"))
os.environ.setdefault("SUPABASE_JWT_SECRET", f"test-secret-{uuid.uuid4().hex}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests load models through fixtures; only the gunicorn processes they start load at start-up.
os.environ["MODEL_LOAD_ON_START"] = "false"
# Tests change tenants and keys with queryset.update() and expect the next request to see it;
# the credential cache has tests of its own.
os.environ.setdefault("AUTH_CACHE_SECONDS", "0")
os.environ.setdefault("QUOTA_PRECHECK_CACHE_SECONDS", "0")

from embedplatform.settings import *  # noqa: F403
