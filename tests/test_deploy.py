"""deploy.py through pyinfra's own CLI against @local, in dry runs that change nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN

ROOT = Path(__file__).parent.parent


def pyinfra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pyinfra"), "inventories/local.py", "deploy.py", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "operations"),
    [
        ("audit", ["Audit KSM"]),
        ("disable", ["Check the disable plan", "Switch off ksmtuned and ksm.service",
                     "Stop KSM merging (run=0)", "Keep KSM off at boot"]),
        ("unmerge", ["Check the unmerge plan", "Stop KSM merging (run=0)",
                     "Unmerge KSM pages (run=2)"]),
        ("enable", ["Check the enable plan", "Switch ksmtuned back on",
                    "Drop the KSM boot persistence"]),
    ],
)  # fmt: skip
def test_dry_run_lists_the_mode_operations(mode: str, operations: list[str]) -> None:
    """--dry shows each operation of the mode and exits 0."""
    result = pyinfra("--dry", "--data", f"ksm_mode={mode}")
    assert result.returncode == 0, result.stderr
    for name in operations:
        assert name in result.stderr + result.stdout


def test_dry_run_json_is_a_plan() -> None:
    """--dry --json prints pyinfra's JSON plan on stdout."""
    result = pyinfra("--dry", "--json", "--data", "ksm_mode=disable")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)


# Each refusal, with the line that says why. The host is failed while the deploy is prepared,
# before any operation is added: ``--dry`` fails it exactly as the real run (-y) does.
REFUSALS = {
    "unknown mode": (
        ["--data", "ksm_mode=disabel"],
        "unknown ksm_mode 'disabel': choose one of audit, disable, unmerge, enable, vm-optout",
    ),
    "bad max fraction": (
        ["--data", "ksm_mode=unmerge", "--data", "ksm_max_fraction=7"],
        "ksm_max_fraction must be a number in (0, 1], not 7",
    ),
    "bad flag": (
        ["--data", "ksm_mode=disable", "--data", "ksm_mask=maybe"],
        "ksm_mask must be true or false, not 'maybe'",
    ),
    "vm-optout off Proxmox VE": (
        ["--data", "ksm_mode=vm-optout"],
        "vm-optout not supported: not a Proxmox VE host (qemu-server is not installed)",
    ),
    "bad vmids": (
        ["--data", "ksm_mode=vm-optout", "--data", "ksm_vmids=100,web"],
        "ksm_vmids must be Proxmox VE VMIDs (100 to 999999999), not '100,web'",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("run", ["--dry", "-y"])
def test_a_refusal_fails_the_host_in_dry_and_real_runs_alike(case: str, run: str) -> None:
    """The same exit code (1) and the same reason with --dry as with -y; nothing runs."""
    data, reason = REFUSALS[case]
    result = pyinfra(run, *data)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reason in result.stderr + result.stdout
    assert "Beginning operation run" not in result.stderr + result.stdout


@pytest.mark.parametrize("run", ["--dry", "-y"])
def test_a_waived_host_is_left_alone_by_deploy_py(run: str) -> None:
    """ksm_waiver in host data: no operation is added, the reason is logged, exit 0."""
    waiver = '{"reason": "lab host", "approved_by": "ciso", "expires": "2031-01-31"}'
    result = pyinfra(run, "--data", "ksm_mode=disable", "--data", f"ksm_waiver={waiver}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "waived until 2031-01-31 (approved by ciso): lab host" in result.stdout + result.stderr
    assert "Switch off ksmtuned" not in result.stdout + result.stderr
