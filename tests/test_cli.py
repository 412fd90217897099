"""The typer CLI, driven in-process with CliRunner against this machine (@local, read-only)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ksm_guard.cli.app import app

runner = CliRunner()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_lists_modes_and_exit_codes() -> None:
    """--help names every mode and documents the exit codes."""
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("audit", "disable", "unmerge", "enable", "Exit codes", "unreachable"):
        assert word in result.stdout


def test_audit_table_names_this_host() -> None:
    """A plain audit prints one row for @local and a summary line."""
    result = runner.invoke(app, ["audit"])
    assert result.exit_code in (0, 1), result.output
    assert result.stdout.splitlines()[1].startswith("@local")
    assert "1 host(s):" in result.stdout


def test_audit_json_follows_the_schema() -> None:
    """--output json prints a schema_version 1 document with the audit figures."""
    result = runner.invoke(app, ["audit", "--output", "json"])
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    host = document["hosts"][0]
    assert host["host"] == "@local"
    assert set(host["audit"]) >= {
        "verdict", "run", "pages_shared", "pages_sharing", "saved_bytes",
        "unmerge_need_bytes", "mem_available_bytes", "units", "boot_persistence",
    }  # fmt: skip
    assert document["exit_code"] == result.exit_code


@pytest.mark.parametrize("mode", ["disable", "unmerge", "enable"])
def test_dry_run_of_each_mode_reports_without_confirmation(mode: str) -> None:
    """--dry-run needs no --yes and says nothing changed."""
    result = runner.invoke(app, [mode, "--dry-run", "--output", "json"])
    document = json.loads(result.stdout)
    assert document["dry_run"] is True
    assert document["hosts"][0]["status"] in ("ok", "would-change")


@pytest.mark.parametrize("mode", ["disable", "unmerge", "enable"])
def test_change_without_yes_off_a_terminal_is_refused(mode: str) -> None:
    """Without a terminal to confirm on, a changing mode wants --yes: exit 2, one line."""
    result = runner.invoke(app, [mode])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"ksm-guard: refusing to {mode} without confirmation: pass --yes (no terminal)"
    )


def test_unknown_output_is_a_usage_error() -> None:
    """An unknown --output value is Click's usage error, exit 2."""
    result = runner.invoke(app, ["audit", "--output", "yaml"])
    assert result.exit_code == 2
    assert "yaml" in result.stderr


def test_out_of_range_fraction_is_a_usage_error() -> None:
    """--max-fraction 0 makes no sense: exit 2 before anything runs."""
    result = runner.invoke(app, ["unmerge", "--dry-run", "--max-fraction", "0"])
    assert result.exit_code == 2
    assert "--max-fraction" in result.stderr


def test_negative_batch_is_a_usage_error() -> None:
    """--batch -1: exit 2, nothing contacted."""
    result = runner.invoke(app, ["unmerge", "--dry-run", "--batch", "-1"])
    assert result.exit_code == 2
    assert "--batch" in result.stderr


@pytest.mark.parametrize(
    "argv", [["--help"], ["audit", "--help"], ["unmerge", "--help"], ["plan", "--help"]]
)
def test_help_does_not_import_pyinfra_or_gevent(argv: list[str]) -> None:
    """Help is answered from typer alone: the engine's heavy imports stay unloaded."""
    probe = (
        "import sys\n"
        f"sys.argv = ['ksm-guard', *{argv!r}]\n"
        "from ksm_guard.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted({'pyinfra', 'gevent', 'paramiko', 'pydantic', 'rich'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert "Usage: ksm-guard" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]"


def test_unreachable_host_beside_a_good_one(write_inventory) -> None:
    """A dead host is reported unreachable (exit 3) while @local is still audited."""
    port = _closed_port()
    path = write_inventory(
        f"hosts = ['@local', ('dead', {{'ssh_hostname': '127.0.0.1', 'ssh_port': {port}}})]\n"
    )
    result = runner.invoke(app, ["audit", "-i", path, "--output", "json"])
    assert result.exit_code == 3
    hosts = {h["host"]: h for h in json.loads(result.stdout)["hosts"]}
    assert hosts["dead"]["verdict"] == "unreachable"
    assert hosts["@local"]["audit"]["verdict"] in (
        "compliant",
        "ksm-running",
        "merged-pages-remain",
    )
    assert "ksm-guard: dead: unreachable: " in result.stderr


def test_limit_selects_hosts(write_inventory) -> None:
    """--limit keeps only the matching hosts: the dead one is never contacted."""
    path = write_inventory(
        "hosts = ['@local', ('dead', {'ssh_hostname': '127.0.0.1', 'ssh_port': 1})]\n"
    )
    result = runner.invoke(app, ["audit", "-i", path, "--limit", "@local", "-o", "json"])
    assert [h["host"] for h in json.loads(result.stdout)["hosts"]] == ["@local"]
    assert result.exit_code in (0, 1)


def test_version() -> None:
    """--version prints the version and exits 0."""
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("ksm-guard ")


def test_audit_costs_exactly_one_remote_command(sent: list[str]) -> None:
    """Counted at the connector: an audit of one host sends one command, the KsmHost fact."""
    from ksm_guard.operations.facts import KSM_HOST_COMMAND

    result = runner.invoke(app, ["audit"])
    assert result.exit_code in (0, 1), result.output
    assert sent == [KSM_HOST_COMMAND]


def test_a_dry_run_reads_the_state_once(sent: list[str]) -> None:
    """unmerge --dry-run: the plan and the report come from the same one read."""
    from ksm_guard.operations.facts import KSM_HOST_COMMAND

    result = runner.invoke(app, ["unmerge", "--dry-run"])
    assert result.exit_code in (0, 1), result.output
    assert sent == [KSM_HOST_COMMAND]


# Dry run and real run of the same request: the same status, detail and exit code. On @local,
# with nothing merged here, each of these either refuses or has nothing to change.
PARITY = {
    "vm-optout off Proxmox VE": ("vm-optout", "", "refused", 1),
    "bad host setting": ("disable", "ksm_mask='maybe'", "refused", 1),
    "bad max fraction": ("unmerge", "ksm_max_fraction='lots'", "refused", 1),
    "nothing to do": ("enable", "", "ok", 0),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_dry_run_and_real_run_agree(case: str, write_inventory) -> None:
    """--dry-run reports what --yes then does, status, reason and exit code alike."""
    mode, data, status, code = PARITY[case]
    inventory = write_inventory(f"hosts = [('@local', dict({data}))]\n")
    results = [
        runner.invoke(app, [mode, flag, "-i", inventory, "-o", "json"])
        for flag in ("--dry-run", "--yes")
    ]
    hosts = [json.loads(result.stdout)["hosts"][0] for result in results]
    assert [result.exit_code for result in results] == [code, code], results[1].output
    assert [host["status"] for host in hosts] == [status, status]
    assert hosts[0]["detail"] == hosts[1]["detail"]
    assert hosts[0]["refusal"] == hosts[1]["refusal"]


def test_serial_and_batch_together_are_a_usage_error() -> None:
    """--serial is --batch 1: giving both is refused (exit 2), not silently resolved."""
    result = runner.invoke(app, ["unmerge", "--dry-run", "--serial", "--batch", "2"])
    assert result.exit_code == 2
    assert "--serial" in result.stderr


def test_a_plan_of_refusals_alone_asks_nothing(write_inventory, monkeypatch) -> None:
    """Nothing would change, only refusals: no prompt; the plan is the result, exit 1."""
    monkeypatch.setattr("ksm_guard.cli.app._interactive", lambda: True)
    inventory = write_inventory("hosts = ['@local']\n")
    result = runner.invoke(app, ["vm-optout", "-i", inventory], input="n\n")
    # Refused hosts alone leave nothing to confirm: the plan is the result, as in a dry run.
    assert result.exit_code == 1
    assert "Apply" not in result.stderr
    assert "vm-optout not supported" in result.stdout
