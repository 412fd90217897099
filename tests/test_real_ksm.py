"""ksm-guard against this machine's real kernel KSM, through @local: pages merged, then unmerged."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, ksm_guard
from tests.localksm import KSM, read
from tests.localssh import LocalSshd, inventory_source
from tests.results import hosts_of

pytestmark = [
    pytest.mark.realksm,
    pytest.mark.skipif(
        not (KSM / "run").exists() or os.geteuid() != 0,
        reason="needs root and a kernel with KSM (/sys/kernel/mm/ksm)",
    ),
]


def figures(text: str) -> str:
    """``text`` with every number as N: the shape of a line whose counts move."""
    return re.sub(r"\d+(\.\d+)?", "N", text)


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
    """A limit below the need: refused with both figures, exit 1; not even run=0 was written."""
    sharing = read("pages_sharing")
    result = ksm_guard("unmerge", "--yes", "--max-fraction", "0.000001", "--output", "json")
    host = json.loads(result.stdout)["hosts"][0]
    assert result.returncode == 1
    assert host["status"] == "refused"
    assert "unsafe unmerge refused: needs" in host["detail"]
    assert "of MemAvailable" in host["detail"]
    assert host["refusal"]["code"] == "unsafe-unmerge"
    assert host["refusal"]["figures"]["need_bytes"] > host["refusal"]["figures"]["allowed_bytes"]
    assert read("run") == 1, "a refused unmerge must not run the disable steps either"
    assert read("pages_sharing") >= sharing // 2 > 0


# Each case: the options, and the status a dry run and then the real run report.
PARITY = {
    "unsafe unmerge": (["unmerge", "--max-fraction", "0.000001"], "refused", "refused", 1),
    "unmerge": (["unmerge"], "would-change", "changed", 0),
    "disable": (["disable"], "would-change", "changed", 0),
    "vm-optout off Proxmox VE": (["vm-optout"], "refused", "refused", 1),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_dry_run_and_real_run_agree(merged_pages: int, case: str) -> None:
    """--dry-run reports the status, reason and exit code the real run then has, on real pages."""
    args, planned, done, code = PARITY[case]
    dry = ksm_guard(*args, "--dry-run", "--output", "json")
    before = read("run")
    real = ksm_guard(*args, "--yes", "--output", "json")
    dry_host, real_host = (json.loads(r.stdout)["hosts"][0] for r in (dry, real))
    assert (dry.returncode, dry_host["status"]) == (code, planned), dry.stderr
    assert (real.returncode, real_host["status"]) == (code, done), real.stderr
    assert (
        dry_host["refusal"] == real_host["refusal"]
        or dry_host["refusal"]["code"]
        == (
            real_host["refusal"]["code"]  # the same refusal; MemAvailable moved in between
        )
    )
    # The same lines; ksmd may merge a few more pages and MemAvailable moves in between.
    assert [figures(line) for line in dry_host["changes"]] == [
        figures(line) for line in real_host["changes"]
    ]
    if done == "refused":
        assert read("run") == before == 1


def test_non_root_dry_run_is_refused_as_the_real_run_is(merged_pages: int, tmp_path) -> None:
    """As nobody, disable --dry-run is refused (exit 1) with the real run's reason."""
    inventory = tmp_path / "nobody.py"
    inventory.write_text("hosts = [('@local', {'_su_user': 'nobody', '_su_shell': '/bin/sh'})]\n")
    results = [
        ksm_guard("disable", flag, "-i", str(inventory), "--output", "json")
        for flag in ("--dry-run", "--yes")
    ]
    hosts = [json.loads(result.stdout)["hosts"][0] for result in results]
    assert [result.returncode for result in results] == [1, 1]
    assert [host["status"] for host in hosts] == ["refused", "refused"]
    assert hosts[0]["detail"] == hosts[1]["detail"]
    assert read("run") == 1


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

    from ksm_guard.cli.app import app

    monkeypatch.setattr("ksm_guard.cli.app._interactive", lambda: True)
    result = CliRunner().invoke(app, ["disable"], input=f"{answer}\n")
    assert "@local  ksm-running" in result.stderr  # the current verdict
    assert "run: 1 → 0" in result.stderr
    assert "plan for disable: 1 would change, 0 refused" in result.stderr
    assert "Apply 'disable' to 1 host(s)?" in result.stderr
    assert result.exit_code == 0
    if answer == "n":
        assert "declined, nothing changed" in result.stdout
    assert read("run") == run_after


def test_ctrl_c_at_the_prompt_exits_130_and_changes_nothing(merged_pages: int) -> None:
    """On a real terminal (a pty), Ctrl-C at the prompt: exit 130, one line, run stays 1."""
    import fcntl
    import select
    import termios

    master, slave = os.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    child = subprocess.Popen(
        [str(BIN / "ksm-guard"), "disable"],
        stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        if select.select([master], [], [], 1)[0]:
            seen += os.read(master, 4096)
    os.write(master, b"\x03")  # the terminal turns it into SIGINT for the foreground group
    assert child.wait(timeout=30) == 130
    rest = b""
    with contextlib.suppress(OSError):
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 4096)
            if not chunk:
                break
            rest += chunk
    os.close(master)
    assert b"Traceback" not in seen + rest
    assert b"nothing changed" in rest
    assert read("run") == 1


@pytest.fixture
def three_names(local_sshd: LocalSshd, tmp_path: Path):
    """Write an inventory naming this machine a, b and c over SSH; keyword: host data per name."""

    def write(**data: dict[str, object]) -> str:
        hosts = [local_sshd.host(name, **data.get(name, {})) for name in ("a", "b", "c")]
        path = tmp_path / "abc.py"
        path.write_text(inventory_source(hosts))
        return str(path)

    return write


def test_rolling_unmerge_goes_one_host_at_a_time(merged_pages: int, three_names) -> None:
    """Batch of one: a unmerges (with its figures), then b, then c find nothing left; in order."""
    sharing = read("pages_sharing")
    result = ksm_guard("unmerge", "--yes", "-i", three_names(), "--progress", "--output", "json")
    hosts = hosts_of(result)
    assert result.returncode == 0, result.stderr
    assert [hosts[name]["status"] for name in "abc"] == ["changed", "ok", "ok"]
    figures = hosts["a"]["unmerge"]
    assert figures["pages"] >= sharing // 2 > 0
    assert figures["bytes"] == figures["pages"] * 4096
    assert figures["seconds"] >= 0 and figures["memory_used_bytes"] > 0
    progress = [line.split("]")[0] for line in result.stderr.splitlines() if "] unmerge:" in line]
    assert [progress.index(f"[{name}") for name in "abc"] == sorted(
        progress.index(f"[{name}") for name in "abc"
    )
    assert (read("pages_shared"), read("pages_sharing")) == (0, 0)


def test_rollout_stops_at_a_memory_refusal(merged_pages: int, three_names) -> None:
    """a's preflight refuses: b and c are not reached, the pages stay merged, exit 1."""
    inventory = three_names(a={"ksm_max_fraction": 0.000001})
    result = ksm_guard("unmerge", "--yes", "-i", inventory)
    assert result.returncode == 1
    assert "rollout refused: a; not reached: b, c" in result.stdout
    assert "b: not reached\n  rollout stopped at a" in result.stdout
    assert read("pages_sharing") > 0


def test_continue_on_error_goes_past_a_refused_host(merged_pages: int, three_names) -> None:
    """a has a bad setting and is refused; --continue-on-error lets b unmerge and c run; exit 1."""
    inventory = three_names(a={"ksm_max_fraction": "bogus"})
    result = ksm_guard(
        "unmerge", "--yes", "--continue-on-error", "-i", inventory, "--output", "json"
    )
    hosts = hosts_of(result)
    assert result.returncode == 1
    assert [hosts[name]["status"] for name in "abc"] == ["refused", "changed", "ok"]
    assert "ksm_max_fraction" in str(hosts["a"]["detail"])
    assert hosts["b"]["unmerge"] is not None
    assert (read("pages_shared"), read("pages_sharing")) == (0, 0)
