#!/bin/sh
# Container start: migrate the database, make sure the model is in the cache, then replace this
# shell with the command (gunicorn), so that it is PID 1 and gets `docker stop`'s SIGTERM itself.
set -eu

here="$(dirname "$0")"

# `NAME=` lines of an env_file arrive as empty variables; they mean "not set" (gunicorn itself
# would fail on an empty WEB_CONCURRENCY before reading its config).
for name in $(env | sed -n 's/^\([A-Z_][A-Z0-9_]*\)=$/\1/p'); do
    unset "$name"
done
# Prometheus's multiprocess files: every process (migrate.py included) writes there, and a /tmp
# that is an empty volume (Kubernetes' read-only root) starts without the folder.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi
if [ "${RUN_MIGRATIONS:-true}" = "true" ]; then
    python "$here/migrate.py"
fi
if [ "${PREFETCH_MODEL:-true}" = "true" ]; then
    python "$here/prefetch_model.py"
fi
exec "$@"
