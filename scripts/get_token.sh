#!/usr/bin/env bash
# Logs into a Supabase project with e-mail and password (its Auth API's password grant) and
# prints the user's access token, ready for `Authorization: Bearer <token>`:
#
#   export TOKEN="$(scripts/get_token.sh)"
#
# SUPABASE_URL and SUPABASE_ANON_KEY come from the environment, else from the project's .env (or
# the file ENV_FILE names, as for the service).
# EMAIL and PASSWORD may be given in the environment; otherwise the script asks (the password
# without echo). Needs only bash, curl and python3. The password never appears on a command line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_FILE="${ENV_FILE:-$ROOT/.env}"

from_env_file() {
    # The value of $1 in .env, quotes removed; empty when absent.
    [ -f "$ENV_FILE" ] || return 0
    NAME="$1" python3 -c '
import os, sys
name = os.environ["NAME"]
for line in open(sys.argv[1], encoding="utf-8"):
    key, sep, value = line.strip().partition("=")
    if sep and key.strip().removeprefix("export ").strip() == name:
        print(value.strip().strip("\"'"'"'"))
        break
' "$ENV_FILE"
}

SUPABASE_URL="${SUPABASE_URL:-$(from_env_file SUPABASE_URL)}"
SUPABASE_ANON_KEY="${SUPABASE_ANON_KEY:-$(from_env_file SUPABASE_ANON_KEY)}"
if [ -z "$SUPABASE_URL" ] || [ -z "$SUPABASE_ANON_KEY" ]; then
    echo "Set SUPABASE_URL and SUPABASE_ANON_KEY (in the environment or in .env)." >&2
    exit 2
fi

EMAIL="${EMAIL:-}"
PASSWORD="${PASSWORD:-}"
if [ -z "$EMAIL" ]; then
    read -r -p "E-mail: " EMAIL
fi
if [ -z "$PASSWORD" ]; then
    read -r -s -p "Password: " PASSWORD
    echo >&2
fi

response="$(mktemp)"
trap 'rm -f "$response"' EXIT

status="$(
    EMAIL="$EMAIL" PASSWORD="$PASSWORD" python3 -c '
import json, os
print(json.dumps({"email": os.environ["EMAIL"], "password": os.environ["PASSWORD"]}))
' | curl --silent --show-error --connect-timeout 10 --max-time 30 \
        --output "$response" --write-out '%{http_code}' \
        --header "apikey: ${SUPABASE_ANON_KEY}" \
        --header "Content-Type: application/json" \
        --data-binary @- \
        "${SUPABASE_URL%/}/auth/v1/token?grant_type=password"
)" || { echo "Could not reach ${SUPABASE_URL}." >&2; exit 1; }

STATUS="$status" python3 -c '
import json, os, sys
status = os.environ["STATUS"]
try:
    body = json.load(open(sys.argv[1], encoding="utf-8"))
except ValueError:
    body = {}
if status == "200" and isinstance(body, dict) and body.get("access_token"):
    print(body["access_token"])
    sys.exit(0)
body = body if isinstance(body, dict) else {}
reason = (
    body.get("msg") or body.get("error_description") or body.get("message") or body.get("error")
    or "no explanation from Supabase"
)
print(f"Login failed (HTTP {status}): {reason}", file=sys.stderr)
sys.exit(1)
' "$response"
