#!/bin/sh
# Container start: migrate the database, make sure the model is in the cache, then replace this
# shell with the command (gunicorn), so that it is PID 1 and gets `docker stop`'s SIGTERM itself.
set -eu

here="$(dirname "$0")"
if [ "${RUN_MIGRATIONS:-true}" = "true" ]; then
    python "$here/migrate.py"
fi
if [ "${PREFETCH_MODEL:-true}" = "true" ]; then
    python "$here/prefetch_model.py"
fi
exec "$@"
