# shellcheck shell=bash
# Shared by serve.sh and test.sh: creates .venv and installs a requirements file into it, once
# per content of that file (a stamp keeps re-runs fast and idempotent).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
# PyPI's Linux wheels of torch, on x86-64 and aarch64 (Ampere, Graviton) alike, are CUDA builds
# that pull gigabytes of NVIDIA libraries a CPU server never uses: on Linux torch comes from
# PyTorch's CPU index instead (or a mirror of it), unless pip already finds a wheel locally.
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

install_cpu_torch() {
    local pin
    pin="$(grep -E '^torch==' "$ROOT/requirements.txt")" || return 0
    [ "$(uname -s)" = "Linux" ] || return 0 # macOS and Windows wheels on PyPI are CPU builds
    if "$VENV/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("torch").split("+")[0] != sys.argv[1])' "${pin#torch==}" 2>/dev/null; then
        return 0
    fi
    # A wheel in a configured find-links folder (a wheelhouse, this project's CI machines) needs
    # no index at all; its own dependencies come with the requirements below.
    if "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-index --no-deps \
        "$pin" 2>/dev/null; then
        return 0
    fi
    echo "Installing $pin from $TORCH_INDEX_URL" >&2
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check --retries 1 --timeout 20 \
        --index-url "$TORCH_INDEX_URL" "$pin"; then
        # Still a working torch, only a much bigger one.
        echo "WARNING: $TORCH_INDEX_URL cannot be reached: torch comes from PyPI (a CUDA build" \
            "on Linux, gigabytes larger). Set TORCH_INDEX_URL to a mirror of the CPU index." >&2
    fi
}

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
        install_cpu_torch
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/$requirements"
        echo "$digest" > "$stamp"
    fi
}
