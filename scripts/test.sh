#!/usr/bin/env bash
# Installs everything the tests need (Python packages into .venv; Chromium and the deployment
# linters from Debian when missing) and runs the whole suite against the machine's PostgreSQL and
# Redis (DATABASE_URL and REDIS_URL override). Extra arguments go to pytest.
set -euo pipefail
# shellcheck source=scripts/_venv.sh
source "$(dirname "$0")/_venv.sh"
ensure_venv requirements-dev.txt
"$ROOT/scripts/system_packages.sh"
cd "$ROOT"
export DATABASE_URL="${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy" .
exec "$VENV/bin/python" -m pytest "$@"
