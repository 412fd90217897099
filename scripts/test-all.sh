#!/usr/bin/env bash
# make test: every tier, in the order of the Makefile's test target. Meanwhile, in the background
# and at a lower priority, the VM images and booted snapshots the VM tier needs are built (only
# what a cold cache lacks; a warm cache takes a second): on this 2-core machine they would
# otherwise add about six minutes before the first VM test. The build's output is shown when it
# ends; a failed build fails the run before the VM tier starts.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
MAKE=${MAKE:-make}
BIN=${BIN:-.venv/bin}
log=$(mktemp)
nice -n 10 "$BIN/python" -m tests.vm build --snapshots >"$log" 2>&1 &
build=$!
cleanup() {
    kill "$build" 2>/dev/null && wait "$build" 2>/dev/null
    rm -f "$log"
}
trap cleanup EXIT
"$MAKE" --no-print-directory lint test-unit test-real test-install || exit 1
echo "--- VM images and snapshots (built in the background) ---"
wait "$build"
built=$?
cat "$log"
[ "$built" -eq 0 ] || exit 1
"$MAKE" --no-print-directory test-vm
