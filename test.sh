#!/usr/bin/env bash
# The test command: installs what the tests need (Python packages into .venv, Azurite from npm, Debian's
# chromium), starts Azurite on 127.0.0.1, runs ruff and pytest (other arguments go to pytest), and stops Azurite
# whatever happens. Installs are skipped when nothing changed since the last run; everything a run writes lives in
# .test-work/ and is removed at the end (pytest keeps the folders of failed tests there for a look).
#
#   bash test.sh            everything
#   bash test.sh --quick    ruff, the unit tests and the end-to-end tests marked quick: no Azurite, no browser
set -euo pipefail
cd "$(dirname "$0")"

quick=0
if [ "${1:-}" = "--quick" ]; then
    quick=1
    shift
fi

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
    echo "test.sh: PYTHON=$python is not an interpreter on PATH" >&2
    exit 2
fi
wanted=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -x .venv/bin/python ]; then
    made_with=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$made_with" != "$wanted" ]; then
        echo "test.sh: .venv was made with Python $made_with, not $python ($wanted); remove it (rm -rf .venv) to rebuild it" >&2
        exit 2
    fi
else
    "$python" -m venv .venv
fi

# Reinstall only when a requirements file or the lock file changed since the last install.
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
python_stamp=$(stamp_of requirements.txt requirements-azure.txt requirements-lake.txt requirements-dev.txt)
if [ "$(cat .venv/.requirements-stamp 2>/dev/null)" != "$python_stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    echo "$python_stamp" >.venv/.requirements-stamp
fi
.venv/bin/ruff check .

work="$PWD/.test-work"
# Temporary files of the tests (hundreds of MB) go to .test-work/, never to /tmp.
export TMPDIR="$work/tmp"
run_pytest() {
    mkdir -p "$TMPDIR"
    status=0
    .venv/bin/python -m pytest -p no:cacheprovider --basetemp "$work/pytest" "$@" || status=$?
    rm -rf "$TMPDIR"
    if [ "$status" -eq 0 ]; then
        rm -rf "$work/pytest"
        rmdir "$work" 2>/dev/null || true
    else
        echo "test.sh: the folders of failed tests are in $work/pytest" >&2
    fi
    return "$status"
}

if [ "$quick" = 1 ]; then
    # On one process per core (up to 4): the unit tests and the few end-to-end runs are independent of each other.
    run_pytest -n auto --maxprocesses 4 -m "(quick or not e2e) and not slow and not azure and not browser" "$@"
    exit
fi

node_stamp=$(stamp_of package.json package-lock.json)
if [ "$(cat node_modules/.lock-stamp 2>/dev/null)" != "$node_stamp" ]; then
    npm ci --no-audit --no-fund --loglevel=error
    echo "$node_stamp" >node_modules/.lock-stamp
fi
# Debian's chromium for the report's browser tests: playwright drives it (its own browser download cannot work here).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "test.sh: /usr/bin/chromium is missing and cannot be installed here: the browser tests will be skipped" >&2
    fi
fi

# Spark and Airflow read what the exporter makes, each from a virtual environment of its own (their dependencies
# would otherwise pin the exporter's). The tests that use them are marked slow.
for tool in spark airflow; do
    envdir=".test-envs/$tool"
    wanted_stamp=$(stamp_of "tests/requirements-$tool.txt")
    if [ "$(cat "$envdir/.requirements-stamp" 2>/dev/null)" != "$wanted_stamp" ]; then
        rm -rf "$envdir"
        "$python" -m venv "$envdir"
        "$envdir/bin/python" -m pip install --quiet --disable-pip-version-check -r "tests/requirements-$tool.txt"
        echo "$wanted_stamp" >"$envdir/.requirements-stamp"
    fi
done
export SPARK_PYTHON="$PWD/.test-envs/spark/bin/python" AIRFLOW_PYTHON="$PWD/.test-envs/airflow/bin/python"

rm -rf "$work/azurite"
mkdir -p "$work/azurite"
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
    rm -rf "$work/azurite"
    rmdir "$work" 2>/dev/null || true
}
trap stop_azurite EXIT

# Azurite with an account made up for this run, on a port the system picks, telling nobody about it.
export AZURITE_ACCOUNT=exporttests
AZURITE_KEY=$(.venv/bin/python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
export AZURITE_KEY
AZURITE_ACCOUNTS="$AZURITE_ACCOUNT:$AZURITE_KEY" node_modules/.bin/azurite-blob \
    --blobHost 127.0.0.1 --blobPort 0 --location "$work/azurite" --skipApiVersionCheck --disableTelemetry \
    >"$work/azurite/azurite.log" 2>&1 &
azurite_pid=$!
for _ in $(seq 1 300); do
    if grep -q "successfully listens" "$work/azurite/azurite.log"; then
        break
    fi
    if ! kill -0 "$azurite_pid" 2>/dev/null; then
        cat "$work/azurite/azurite.log" >&2
        echo "Azurite did not start" >&2
        exit 1
    fi
    sleep 0.1
done
AZURITE_BLOB_ENDPOINT=$(grep -o "successfully listens on http://[0-9.:]*" "$work/azurite/azurite.log" | sed 's/.* on //')
if [ -z "$AZURITE_BLOB_ENDPOINT" ]; then
    echo "Azurite did not report its address within 30 s" >&2
    exit 1
fi
export AZURITE_BLOB_ENDPOINT

run_pytest "$@"
