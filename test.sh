#!/usr/bin/env bash
# The test command: installs what the tests need (Python packages into .venv, Azurite from npm), starts Azurite
# on 127.0.0.1, runs ruff and pytest (arguments go to pytest), and stops Azurite whatever happens.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
npm ci --no-audit --no-fund --loglevel=error

.venv/bin/ruff check .

# Azurite with an account made up for this run, on a port the system picks.
azurite_dir=$(mktemp -d)
azurite_pid=""
stop_azurite() {
    if [ -n "$azurite_pid" ]; then
        # Azurite closes its service on SIGTERM but its process can linger: give it 5 s, then end it.
        kill "$azurite_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$azurite_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$azurite_pid" 2>/dev/null || true
        wait "$azurite_pid" 2>/dev/null || true
    fi
    rm -rf "$azurite_dir"
}
trap stop_azurite EXIT
export AZURITE_ACCOUNT=exporttests
AZURITE_KEY=$(.venv/bin/python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
export AZURITE_KEY
AZURITE_ACCOUNTS="$AZURITE_ACCOUNT:$AZURITE_KEY" node_modules/.bin/azurite-blob \
    --blobHost 127.0.0.1 --blobPort 0 --location "$azurite_dir" --skipApiVersionCheck \
    >"$azurite_dir/azurite.log" 2>&1 &
azurite_pid=$!
for _ in $(seq 1 300); do
    if grep -q "successfully listens" "$azurite_dir/azurite.log"; then
        break
    fi
    if ! kill -0 "$azurite_pid" 2>/dev/null; then
        cat "$azurite_dir/azurite.log" >&2
        echo "Azurite did not start" >&2
        exit 1
    fi
    sleep 0.1
done
AZURITE_BLOB_ENDPOINT=$(grep -o "successfully listens on http://[0-9.:]*" "$azurite_dir/azurite.log" | sed 's/.* on //')
if [ -z "$AZURITE_BLOB_ENDPOINT" ]; then
    echo "Azurite did not report its address within 30 s" >&2
    exit 1
fi
export AZURITE_BLOB_ENDPOINT

.venv/bin/python -m pytest "$@"
