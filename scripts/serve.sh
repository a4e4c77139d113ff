#!/usr/bin/env bash
# Installs everything into .venv and serves the API with gunicorn on port 8000 (PORT overrides).
# With no configuration it runs on the embedded default: SQLite and secrets under var/, a local
# cache and the bundled all-MiniLM-L6-v2. A .env file or the environment configures the rest.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "$0")/_venv.sh"
ensure_venv requirements.txt
cd "$ROOT"
export HF_HUB_DISABLE_TELEMETRY=1
# glibc gives each thread its own heap arena otherwise, and a worker's memory grows by gigabytes
# under large requests and stays there; the image sets the same.
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
"$VENV/bin/python" manage.py migrate --noinput
"$VENV/bin/python" manage.py collectstatic --noinput --verbosity 0
exec "$VENV/bin/gunicorn" -c embedplatform/gunicorn.conf.py
