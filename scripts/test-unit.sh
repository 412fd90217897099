#!/usr/bin/env bash
# The unit tier as three pytest processes at once (make test-unit). Its slow tests wait on
# sockets, subprocesses and timeouts rather than on the CPU. pytest-xdist cannot run them:
# pyinfra_cli (imported by pyinfra-testing) gevent-patches the worker and stalls its channel.
# Two groups of the tests that talk to sshd, pyinfra's CLI, a resolver or a browser; the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
MARKS="not realksm and not install"
GROUP1=(tests/test_verify.py tests/test_inventory.py tests/test_interrupt.py)
GROUP2=(tests/test_connect.py tests/test_fleet.py tests/test_evidence_report.py
        tests/test_deploy.py)
ignore=()
for file in "${GROUP1[@]}" "${GROUP2[@]}"; do ignore+=(--ignore "$file"); done
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
"$PYTEST" "${GROUP1[@]}" -m "$MARKS" "$@" >"$logs/1" 2>&1 &
one=$!
"$PYTEST" "${GROUP2[@]}" -m "$MARKS" "$@" >"$logs/2" 2>&1 &
two=$!
"$PYTEST" tests --ignore=tests/integration "${ignore[@]}" -m "$MARKS" "$@"
rest=$?
wait "$one"; one_rc=$?
wait "$two"; two_rc=$?
for n in 1 2; do echo "--- group $n ---"; cat "$logs/$n"; done
[ "$one_rc" -eq 0 ] && [ "$two_rc" -eq 0 ] && [ "$rest" -eq 0 ]
