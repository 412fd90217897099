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
        ("disable", ["Switch off ksmtuned and ksm.service", "Stop KSM merging (run=0)",
                     "Keep KSM off at boot"]),
        ("unmerge", ["Stop KSM merging (run=0)", "Unmerge KSM pages (run=2)"]),
        ("enable", ["Switch ksmtuned back on", "Drop the KSM boot persistence"]),
        ("vm-optout", ["Opt Proxmox VE VMs out of KSM (allow-ksm 0)"]),
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


def test_unknown_mode_fails_the_host_with_a_clear_message() -> None:
    """A misspelt ksm_mode fails the host (exit 1) and names the valid modes."""
    result = pyinfra("-y", "--data", "ksm_mode=disabel")
    assert result.returncode == 1
    assert "unknown ksm_mode 'disabel': choose one of audit, disable, unmerge, enable" in (
        result.stderr + result.stdout
    )


def test_bad_option_value_fails_the_host() -> None:
    """ksm_max_fraction outside (0, 1] fails the host and says why."""
    result = pyinfra("-y", "--data", "ksm_mode=unmerge", "--data", "ksm_max_fraction=7")
    assert result.returncode == 1
    assert "ksm_max_fraction must be a number in (0, 1]" in result.stderr + result.stdout


def test_vm_optout_off_proxmox_fails_the_host_saying_why() -> None:
    """vm-optout where qemu-server is not installed: the host fails, told it is not Proxmox VE."""
    result = pyinfra("-y", "--data", "ksm_mode=vm-optout")
    assert result.returncode == 1
    assert "vm-optout not supported: not a Proxmox VE host" in result.stderr + result.stdout


def test_bad_vmids_fail_the_host() -> None:
    """ksm_vmids that are not VMIDs fail the host before anything runs."""
    result = pyinfra("-y", "--data", "ksm_mode=vm-optout", "--data", "ksm_vmids=100,web")
    assert result.returncode == 1
    assert "ksm_vmids must be Proxmox VE VMIDs (100 to 999999999), not '100,web'" in (
        result.stderr + result.stdout
    )
