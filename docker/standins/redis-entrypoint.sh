#!/bin/sh
# What the official redis image does without a config file: the server is reachable from the other
# containers (protected mode off), whatever options the command adds.
set -eu
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec redis-server --protected-mode no --bind 0.0.0.0 "$@"
fi
exec "$@"
