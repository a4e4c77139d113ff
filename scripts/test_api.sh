#!/usr/bin/env bash
# Quick curl checks of a running embedplatform: every endpoint answers as it should.
#
#   BASE_URL=https://embed.example.com JWT_TOKEN=<token> scripts/test_api.sh
#
# JWT_TOKEN is a Supabase access token (or a tenant API key). METRICS_TOKEN, when the deployment
# sets one, is sent to /metrics. Prints one line per check and a summary; exits 1 if any failed.
set -uo pipefail

BASE_URL="${BASE_URL:-http://localhost:8000}"
BASE_URL="${BASE_URL%/}"
if [ -z "${JWT_TOKEN:-}" ]; then
    echo "Set JWT_TOKEN to a Supabase access token or a tenant API key." >&2
    exit 2
fi
TIMEOUT="${TIMEOUT:-60}"

passed=0
failed=0
body="$(mktemp)"
trap 'rm -f "$body"' EXIT

# check NAME STATUS PATTERN CURL_ARGS...: the answer must have STATUS and a body matching PATTERN
# (an extended regular expression, case-insensitive).
check() {
    local name="$1" want_status="$2" pattern="$3"
    shift 3
    local status
    status="$(curl -sS -o "$body" -w '%{http_code}' --max-time "$TIMEOUT" "$@")" || status="000"
    if [ "$status" = "$want_status" ] && grep -Eqi -- "$pattern" "$body"; then
        passed=$((passed + 1))
        printf 'ok    %-44s %s\n' "$name" "$status"
    else
        failed=$((failed + 1))
        printf 'FAIL  %-44s got %s, wanted %s and /%s/\n' "$name" "$status" "$want_status" "$pattern"
        printf '      %s\n' "$(head -c 300 "$body")"
    fi
}

auth=(-H "Authorization: Bearer $JWT_TOKEN")
json=(-H "Content-Type: application/json")

check "GET /health" 200 '"status": ?"ok"' "$BASE_URL/health"
check "POST /embed" 200 '"embedding": ?\[' "${auth[@]}" "${json[@]}" \
    -d '{"text": "안녕하세요, 반갑습니다!"}' "$BASE_URL/embed"
check "POST /batch-embed" 200 '"embeddings": ?\[\[' "${auth[@]}" "${json[@]}" \
    -d '{"texts": ["첫 번째", "두 번째", "세 번째"]}' "$BASE_URL/batch-embed"
check "POST /v1/embeddings" 200 '"object": ?"list"' "${auth[@]}" "${json[@]}" \
    -d '{"input": ["hello world"], "encoding_format": "float"}' "$BASE_URL/v1/embeddings"
check "POST /embed with an empty text: 422" 422 '"type": ?"invalid_request_error"' \
    "${auth[@]}" "${json[@]}" -d '{"text": ""}' "$BASE_URL/embed"
check "POST /embed without a token: 401" 401 '"type": ?"authentication_error"' "${json[@]}" \
    -d '{"text": "x"}' "$BASE_URL/embed"
check "GET /usage" 200 '"remaining_tokens"' "${auth[@]}" "$BASE_URL/usage"
if [ -n "${METRICS_TOKEN:-}" ]; then
    check "GET /metrics (with METRICS_TOKEN)" 200 '^embed_requests_total' \
        -H "Authorization: Bearer $METRICS_TOKEN" "$BASE_URL/metrics"
else
    check "GET /metrics" 200 '^embed_requests_total' "$BASE_URL/metrics"
fi
check "GET /docs (Swagger UI)" 200 'swagger' "$BASE_URL/docs"
check "GET /redoc" 200 'redoc' "$BASE_URL/redoc"
check "GET /openapi.json" 200 '"openapi"' "$BASE_URL/openapi.json"

total=$((passed + failed))
if [ "$failed" -eq 0 ]; then
    echo "summary: all $total checks of $BASE_URL passed"
    exit 0
fi
echo "summary: $failed of $total checks of $BASE_URL FAILED"
exit 1
