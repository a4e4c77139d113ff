# shellcheck shell=bash
# Shared by serve.sh and test.sh: creates .venv and installs a requirements file into it, once
# per content of that file (a stamp keeps re-runs fast and idempotent).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
    local requirements="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp digest
    stamp="$VENV/.installed-$(basename "$requirements")"
    digest="$(cat "$ROOT/requirements.txt" "$ROOT/$requirements" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/$requirements"
        echo "$digest" > "$stamp"
    fi
}
