#!/usr/bin/env bash
# The unit tier as six pytest processes at once (make test-unit). Its slow tests wait on
# sockets, subprocesses and timeouts rather than on the CPU. pytest-xdist cannot run them:
# pyinfra_cli (imported by pyinfra-testing) gevent-patches the worker and stalls its channel.
# Four groups of the tests that talk to sshd, pyinfra's CLI, a resolver or a browser; the rest,
# CPU-bound, in two halves of about equal time (one per core).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTEST=${PYTEST:-.venv/bin/pytest}
MARKS="not realksm and not install"
GROUPS_OF_FILES=(
    "tests/test_verify.py"
    "tests/test_inventory.py tests/test_interrupt.py"
    "tests/test_evidence_report.py tests/test_connect.py"
    "tests/test_deploy.py tests/test_fleet.py"
    "tests/test_cluster.py tests/test_netutil.py tests/test_cli_vms.py tests/test_cli.py
     tests/test_rollout_order.py tests/test_cli_plan.py"
)
ignore=()
for group in "${GROUPS_OF_FILES[@]}"; do
    for file in $group; do ignore+=(--ignore "$file"); done
done
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
pids=()
for n in "${!GROUPS_OF_FILES[@]}"; do
    # shellcheck disable=SC2086  # a group is a list of paths without spaces
    "$PYTEST" ${GROUPS_OF_FILES[$n]} -m "$MARKS" "$@" >"$logs/$n" 2>&1 &
    pids+=($!)
done
"$PYTEST" tests --ignore=tests/integration "${ignore[@]}" -m "$MARKS" "$@"
failed=$?
for n in "${!pids[@]}"; do
    wait "${pids[$n]}" || failed=1
    echo "--- group $((n + 1)): ${GROUPS_OF_FILES[$n]} ---"
    cat "$logs/$n"
done
exit "$failed"
