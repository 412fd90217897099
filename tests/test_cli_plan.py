"""``ksm-guard plan`` through typer's CliRunner: from saved audits, and live from this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bench.netutil import free_port
from ksm_guard.cli.app import app
from ksm_guard.cli.capacity import capacity_summary, exit_code
from ksm_guard.cli.capacity_render import as_json
from ksm_guard.operations.capacity import CapacityInputError, hosts_from_document, plan_capacity
from tests.test_capacity import CASES, load_case

runner = CliRunner()
CASE_DIR = CASES[0].parent


def saved(tmp_path: Path, case: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A case's audit document written as ``ksm-guard audit -o json`` would have saved it."""
    document, options, expected = load_case(CASE_DIR / f"{case}.yaml")
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(document))
    return path, options, expected


def _option_args(options: dict[str, Any]) -> list[str]:
    return [
        arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_plan_from_a_saved_audit_prints_the_plan(path: Path, tmp_path: Path) -> None:
    """plan --from FILE -o json: the core's document and exit code, nothing contacted."""
    file, options, expected = saved(tmp_path, path.stem)
    result = runner.invoke(app, ["plan", "--from", str(file), "-o", "json", *_option_args(options)])
    capacity = plan_capacity(hosts_from_document(json.loads(file.read_text())), **options)
    assert result.exit_code == expected["exit_code"] == exit_code(capacity), result.output
    assert json.loads(result.stdout) == json.loads(as_json(capacity, exit_code(capacity)))


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_the_report_gets_the_document_plan_prints(path: Path, tmp_path: Path) -> None:
    """capacity_summary(saved result): the dict plan --from FILE -o json prints, exit code too."""
    file, options, _ = saved(tmp_path, path.stem)
    result = runner.invoke(app, ["plan", "--from", str(file), "-o", "json", *_option_args(options)])
    summary = capacity_summary(json.loads(file.read_text()), **options)
    assert summary == json.loads(result.stdout)
    assert summary["exit_code"] == result.exit_code


def test_capacity_summary_refuses_a_document_it_cannot_read() -> None:
    """A document without hosts raises the one-line CapacityInputError plan prints."""
    with pytest.raises(CapacityInputError, match="no hosts list"):
        capacity_summary({"hosts": []})


def test_the_table_names_the_moves_and_the_pool(tmp_path: Path) -> None:
    """The table: a row per host, the moves in order, why a host is unsafe, the pool line."""
    file, _, _ = saved(tmp_path, "two_moves_largest_first")
    result = runner.invoke(app, ["plan", "--from", str(file)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0  # a safe plan exists: moves needed is not a failure
    assert lines[0].split()[:3] == ["HOST", "RAM", "AVAILABLE"]
    assert [line.split()[0] for line in lines[1:4]] == ["pve-a", "pve-b", "pve-c"]
    assert "  VM 102 (b): pve-a → pve-c, 12.0 GiB (rss; 4.0 GiB merged)" in lines
    assert "  VM 103 (c): pve-a → pve-c, 6.0 GiB (rss; 2.0 GiB merged)" in lines
    assert any(line.startswith("pve-a: unsafe: unmerge refused: needs 14.0 GiB") for line in lines)
    assert lines[-1].startswith("pool: 3 host(s), 1 unsafe as they are; RAM 192.0 GiB")
    assert lines[-1].endswith("2 move(s), 18.0 GiB: every host safe after the moves; exit 0")


def test_the_table_has_the_qm_lines_with_node_names(tmp_path: Path) -> None:
    """Under each Proxmox VM's move, its qm line; hosts without a node name are said so."""
    file, _, _ = saved(tmp_path, "node_names")
    result = runner.invoke(app, ["plan", "--from", str(file)])
    lines = result.stdout.splitlines()
    start = lines.index("  VM 201 (web): pve-a → 10.0.0.2, 8.0 GiB (rss; 2.0 GiB merged)")
    assert lines[start + 1] == "    on pve-a: qm migrate 201 pve-b --online"
    assert lines[start + 2].startswith("  pid 3001 (plain-qemu): pve-a → 10.0.0.2, 6.0 GiB")
    assert "qm" not in lines[start + 3]
    assert (
        "pve-a: no node name in its audit (evidence.hostname): the qm lines use its inventory name"
        in lines
    )
    assert not any(line.startswith("10.0.0.2: no node name") for line in lines)


def test_the_table_has_the_n_plus_1_line(tmp_path: Path) -> None:
    """Above the pool line: whether the others take the most loaded host's VMs, and how short."""
    file, _, _ = saved(tmp_path, "n_plus_1_short")
    result = runner.invoke(app, ["plan", "--from", str(file)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0  # N+1 informs; it does not decide the exit code
    assert lines[-2] == (
        "N+1: if pve-a fails, its 4 VM(s) (40.0 GiB, 1 of unknown size not counted) do not fit "
        "on the other hosts with KSM off, each keeping 10% of RAM available: 8.0 GiB short"
    )
    assert lines[-1].startswith("pool: 3 host(s), 0 unsafe as they are")


def test_the_table_says_what_ram_is_missing(tmp_path: Path) -> None:
    """When the pool cannot absorb it, the pool line says how much RAM is missing, where."""
    file, _, _ = saved(tmp_path, "impossible")
    result = runner.invoke(app, ["plan", "--from", str(file)])
    assert result.exit_code == 1
    assert "pve-a: still unsafe after the moves, 23.0 GiB missing" in result.stdout
    assert result.stdout.rstrip().endswith(
        "the pool cannot absorb it: 23.0 GiB of RAM missing (pve-a 23.0 GiB); exit 1"
    )


def test_plan_reads_the_audit_from_stdin(tmp_path: Path) -> None:
    """--from - reads the document from stdin: audit -o json | plan --from -."""
    file, _, _ = saved(tmp_path, "all_safe")
    result = runner.invoke(app, ["plan", "--from", "-", "-o", "json"], input=file.read_text())
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outcome"] == "safe"


def test_an_unread_host_is_named_on_stderr_and_exits_3(tmp_path: Path) -> None:
    """A host the saved audit could not read: exit 3, one stderr line, the others planned."""
    file, _, _ = saved(tmp_path, "unreachable_host")
    result = runner.invoke(app, ["plan", "--from", str(file)])
    assert result.exit_code == 3
    assert result.stderr == "ksm-guard: pve-dead: unreachable: Could not connect (timed out)\n"
    assert result.stdout.splitlines()[1].split()[-1] == "yes"


def test_limit_keeps_the_matching_hosts_of_the_file(tmp_path: Path) -> None:
    """--limit with --from: host-name globs over the file's hosts."""
    file, _, _ = saved(tmp_path, "two_moves_largest_first")
    result = runner.invoke(app, ["plan", "--from", str(file), "--limit", "pve-[bc]", "-o", "json"])
    assert result.exit_code == 0
    assert [host["host"] for host in json.loads(result.stdout)["hosts"]] == ["pve-b", "pve-c"]


USAGE = {
    "no such file": (
        ["--from", "/nonexistent/audit.json"],
        "ksm-guard: cannot plan from /nonexistent/audit.json: [Errno 2] No such file",
    ),
    "not JSON": (["--from", "{bad}"], "ksm-guard: cannot plan from {bad}: Expecting"),
    "no audit fields": (
        ["--from", "{nofield}"],
        "ksm-guard: cannot plan from {nofield}: hosts[0] (h).audit.mem_total_bytes must be",
    ),
    "headroom of 1": (["--min-headroom", "1"], "--min-headroom"),
    "headroom below 0": (["--min-headroom", "-0.1"], "--min-headroom"),
    "fraction of 0": (["--max-fraction", "0"], "--max-fraction"),
    "prometheus": (["-o", "prometheus"], "prometheus"),
    "file and inventory": (
        ["--from", "{good}", "-i", "@local"],
        "ksm-guard: --from and --inventory exclude each other: the file is the fleet",
    ),
    "limit matching nothing": (
        ["--from", "{good}", "--limit", "nothere"],
        "ksm-guard: --limit nothere matches no host of {good}",
    ),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_2(case: str, tmp_path: Path) -> None:
    """Bad options and unreadable files: exit 2, a line on stderr, nothing planned."""
    files = {
        "bad": tmp_path / "bad.json",
        "nofield": tmp_path / "nofield.json",
        "good": saved(tmp_path, "all_safe")[0],
    }
    files["bad"].write_text("{not json")
    files["nofield"].write_text(json.dumps({"hosts": [{"host": "h", "audit": {}}]}))
    args, message = USAGE[case]
    formatted = [arg.format(**files) for arg in args]
    result = runner.invoke(app, ["plan", *formatted])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message.format(**files) in result.stderr


def test_max_fraction_overrides_the_saved_fraction(tmp_path: Path) -> None:
    """--max-fraction with --from judges every host by it, as unmerge --max-fraction would."""
    file, _, _ = saved(tmp_path, "own_max_fraction")
    result = runner.invoke(
        app, ["plan", "--from", str(file), "--max-fraction", "0.9", "-o", "json"]
    )
    capacities = [host["capacity"] for host in json.loads(result.stdout)["hosts"]]
    assert {capacity["unmerge_max_fraction"] for capacity in capacities} == {0.9}
    assert result.exit_code == 0


# -- live, this machine (@local) --------------------------------------------------------------


def test_plan_live_reads_each_host_once(sent: list[str]) -> None:
    """plan -i @local reads the host with the one command audit sends, and changes nothing."""
    from ksm_guard.operations.facts import KSM_HOST_COMMAND

    result = runner.invoke(app, ["plan", "-i", "@local", "-o", "json"])
    assert result.exit_code in (0, 1), result.output
    assert sent == [KSM_HOST_COMMAND]


def test_plan_live_has_the_audit_figures() -> None:
    """plan's figures for @local are audit's: RAM, the need, the host's fraction."""
    audit = json.loads(runner.invoke(app, ["audit", "-o", "json"]).stdout)["hosts"][0]["audit"]
    result = runner.invoke(app, ["plan", "-o", "json"])
    capacity = json.loads(result.stdout)["hosts"][0]["capacity"]
    assert capacity["mem_total_bytes"] == audit["mem_total_bytes"]
    assert capacity["unmerge_max_fraction"] == audit["unmerge_max_fraction"] == 0.5
    assert result.exit_code == (0 if capacity["safe"] else 1)


def test_plan_live_uses_the_host_fraction(write_inventory) -> None:
    """Host data ksm_max_fraction is the fraction the plan judges the host by."""
    inventory = write_inventory("hosts = [('@local', {'ksm_max_fraction': 0.25})]\n")
    result = runner.invoke(app, ["plan", "-i", inventory, "-o", "json"])
    capacity = json.loads(result.stdout)["hosts"][0]["capacity"]
    assert capacity["unmerge_max_fraction"] == 0.25
    assert capacity["unmerge_allowed_bytes"] == int(capacity["mem_available_bytes"] * 0.25)


def test_plan_live_bad_settings_block_the_host(write_inventory) -> None:
    """A host data error unmerge would refuse on makes the host unsafe, whatever its memory."""
    inventory = write_inventory("hosts = [('@local', {'ksm_max_fraction': 'lots'})]\n")
    result = runner.invoke(app, ["plan", "-i", inventory, "-o", "json"])
    host = json.loads(result.stdout)["hosts"][0]["capacity"]
    assert result.exit_code == 1
    assert host["safe"] is False
    assert host["reasons"][0].startswith("ksm_max_fraction must be a number in (0, 1]")


def test_plan_live_unreachable_host_exits_3(write_inventory) -> None:
    """A dead host beside @local: exit 3, named on stderr; @local is still planned."""
    port = free_port()
    inventory = write_inventory(
        f"hosts = ['@local', ('dead', {{'ssh_hostname': '127.0.0.1', 'ssh_port': {port}}})]\n"
    )
    result = runner.invoke(app, ["plan", "-i", inventory, "-o", "json"])
    hosts = {host["host"]: host for host in json.loads(result.stdout)["hosts"]}
    assert result.exit_code == 3
    assert hosts["dead"]["capacity"] is None
    assert hosts["dead"]["detail"].startswith("unreachable: ")
    assert hosts["@local"]["capacity"]["mem_total_bytes"] > 0
    assert "ksm-guard: dead: unreachable: " in result.stderr
