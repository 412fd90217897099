"""ksm-guard against this machine's real kernel KSM, through @local: pages merged, then unmerged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN

KSM = Path("/sys/kernel/mm/ksm")
WORKLOAD = Path(__file__).parent / "vm" / "workload.py"
MIB = 64

pytestmark = [
    pytest.mark.realksm,
    pytest.mark.skipif(
        not (KSM / "run").exists() or os.geteuid() != 0,
        reason="needs root and a kernel with KSM (/sys/kernel/mm/ksm)",
    ),
]


def read(name: str) -> int:
    """A KSM counter or knob, read straight from sysfs (not through ksm-guard)."""
    return int((KSM / name).read_text())


def write(name: str, value: int) -> None:
    (KSM / name).write_text(f"{value}\n")


def ksm_guard(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as an admin would."""
    return subprocess.run(
        [str(BIN / "ksm-guard"), *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def merged_pages() -> Iterator[int]:
    """A process holding identical MADV_MERGEABLE pages, merged by a running ksmd.

    Yields the workload's pid. Afterwards the process is gone, nothing is left merged (with ksmd
    stopped, an exited process's KSM pages stay counted until an unmerge) and run reads 0.
    """
    knobs = {name: read(name) for name in ("pages_to_scan", "sleep_millisecs")}
    write("run", 2)  # start from nothing merged
    write("run", 0)
    workload = subprocess.Popen(
        [sys.executable, str(WORKLOAD), str(MIB), "", "600"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert workload.stdout is not None and workload.stdout.readline().strip() == "ready"
        write("pages_to_scan", 10000)
        write("sleep_millisecs", 10)
        write("run", 1)
        deadline = time.monotonic() + 60
        while read("pages_sharing") < MIB * 256 // 2:
            assert time.monotonic() < deadline, f"ksmd merged only {read('pages_sharing')} pages"
            time.sleep(0.2)
        yield workload.pid
    finally:
        workload.kill()
        workload.wait(timeout=30)
        write("run", 0)
        write("run", 2)
        write("run", 0)
        for name, value in knobs.items():
            write(name, value)


def test_audit_sees_ksm_running_and_saved_bytes(merged_pages: int) -> None:
    """With ksmd merging, audit says ksm-running, counts the saved bytes, and exits 1."""
    result = ksm_guard("audit", "--output", "json")
    host = json.loads(result.stdout)["hosts"][0]
    assert result.returncode == 1, result.stderr
    assert host["verdict"] == "ksm-running"
    assert host["audit"]["saved_bytes"] >= read("pages_sharing") * 4096 // 2 > 0


def test_dry_run_changes_nothing(merged_pages: int) -> None:
    """unmerge --dry-run lists run: 1 → 0 and the unmerge, and leaves the kernel as it was."""
    sharing = read("pages_sharing")
    result = ksm_guard("unmerge", "--dry-run", "--output", "json")
    host = json.loads(result.stdout)["hosts"][0]
    assert host["status"] == "would-change"
    assert "run: 1 → 0" in host["changes"]
    assert read("run") == 1
    assert read("pages_sharing") >= sharing // 2 > 0


def test_disable_then_unmerge_then_nothing_to_do(merged_pages: int) -> None:
    """disable stops merging but keeps pages merged; unmerge frees them; a rerun changes nothing."""
    disabled = ksm_guard("disable", "--yes")
    assert disabled.returncode == 0, disabled.stderr
    assert read("run") == 0
    assert read("pages_sharing") > 0, "disable must not unmerge"

    unmerged = ksm_guard("unmerge", "--yes", "--output", "json")
    assert unmerged.returncode == 0, unmerged.stderr
    assert (read("run"), read("pages_shared"), read("pages_sharing")) == (2, 0, 0)
    assert json.loads(unmerged.stdout)["hosts"][0]["verdict"] == "compliant"

    again = ksm_guard("unmerge", "--yes", "--output", "json")
    host = json.loads(again.stdout)["hosts"][0]
    assert (again.returncode, host["status"], host["changes"]) == (0, "ok", [])


def test_unsafe_unmerge_is_refused_and_changes_nothing(merged_pages: int) -> None:
    """A limit below the need: refused with both figures, exit 1, pages still merged."""
    sharing = read("pages_sharing")
    result = ksm_guard("unmerge", "--yes", "--max-fraction", "0.000001", "--output", "json")
    host = json.loads(result.stdout)["hosts"][0]
    assert result.returncode == 1
    assert host["status"] == "refused"
    assert "unsafe unmerge refused: needs" in host["detail"]
    assert "of MemAvailable" in host["detail"]
    assert read("pages_sharing") >= sharing // 2 > 0


def test_non_root_gets_permission_denied_and_changes_nothing(merged_pages: int, tmp_path) -> None:
    """As an unprivileged user (su nobody), disable is refused as permission denied; run stays 1."""
    inventory = tmp_path / "nobody.py"
    inventory.write_text("hosts = [('@local', {'_su_user': 'nobody', '_su_shell': '/bin/sh'})]\n")
    result = ksm_guard("disable", "--yes", "-i", str(inventory), "--output", "json")
    host = json.loads(result.stdout)["hosts"][0]
    assert result.returncode == 1
    assert host["status"] == "refused"
    assert host["detail"].startswith("permission denied: connected as uid 65534")
    assert read("run") == 1


def test_deploy_py_unmerges_through_pyinfra(merged_pages: int) -> None:
    """`pyinfra inventories/local.py deploy.py --data ksm_mode=unmerge` does the same job."""
    result = subprocess.run(
        [str(BIN / "pyinfra"), "-y", "inventories/local.py", "deploy.py", "--data",
         "ksm_mode=unmerge"],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (read("run"), read("pages_shared"), read("pages_sharing")) == (2, 0, 0)


def test_verify_fails_while_merged_and_passes_after_unmerge(merged_pages: int, tmp_path) -> None:
    """The shipped testinfra checks fail on merging pages (exit 1) and pass after unmerge."""
    before = ksm_guard("verify", "--junit-xml", str(tmp_path / "before.xml"))
    assert before.returncode == 1, before.stdout
    assert "test_ksm_is_not_merging" in before.stdout
    assert ksm_guard("unmerge", "--yes").returncode == 0
    after = ksm_guard("verify", "--junit-xml", str(tmp_path / "after.xml"))
    assert after.returncode == 0, after.stdout
    assert (tmp_path / "after.xml").read_text().count("<testcase") == 8


@pytest.mark.parametrize(("answer", "run_after"), [("n", 1), ("y", 0)])
def test_terminal_confirmation(
    merged_pages: int, monkeypatch: pytest.MonkeyPatch, answer: str, run_after: int
) -> None:
    """On a terminal, disable shows the plan and asks; 'n' changes nothing, 'y' goes ahead."""
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setattr("cli.app._interactive", lambda: True)
    result = CliRunner().invoke(app, ["disable"], input=f"{answer}\n")
    assert "run: 1 → 0" in result.stderr
    assert "Apply 'disable' to these hosts?" in result.stderr
    assert read("run") == run_after
