"""The sharing map's parsing, sums, table, Prometheus gauges and report, from fixtures and @fake."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyinfra.api.exceptions import FactProcessError
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.operations.facts import parse_ksm_host
from ksm_guard.operations.model import HostState
from ksm_guard.operations.sharing import (
    SCAN_SCRIPT,
    apply_scan,
    parse_pools,
    parse_scan,
    parse_tags,
    sharing_command,
    tenant_pairs,
)

runner = CliRunner()
HERE = Path(__file__).parent
SCAN = HERE / "sharing" / "pve9_three_vms.yaml"
MIB = 1024 * 1024


def _scan_lines() -> list[str]:
    return yaml.safe_load(SCAN.read_text())["output"]


def _host_lines() -> list[str]:
    return yaml.safe_load(
        (HERE / yaml.safe_load(SCAN.read_text())["host_fixture"].removeprefix("tests/")).read_text()
    )["output"]


def _state() -> HostState:
    state = parse_ksm_host(_host_lines())
    apply_scan(state, parse_scan(_scan_lines()))
    return state


def _vm(state: HostState, vmid: str) -> Any:
    return next(vm for vm in state["vms"] if vm["vmid"] == vmid)


def test_scan_lines_parse_to_vms_pairs_and_cpu() -> None:
    """Each perl line lands where it belongs: per VM figures, pairs by pid, CPU seconds."""
    scan = parse_scan(_scan_lines())
    assert scan["error"] is None
    assert scan["vms"][4242] == {
        "scanned_pages": 1572864, "ksm_pages": 3100, "within_pages": 400, "other_pages": 12,
        "error": None,
    }  # fmt: skip
    assert scan["pairs"] == {(4242, 5151): 2048, (4242, 6161): 50, (5151, 6161): 50}
    assert scan["cpu_seconds"] == 0.61


def test_pool_lines_give_each_vmid_its_pool() -> None:
    """user.cfg pool lines: VMIDs in the fourth field, comma-separated; an empty pool has none."""
    lines = [line for line in _scan_lines() if line.startswith("/etc/pve/user.cfg")]
    assert parse_pools(lines) == {"100": "acme", "102": "acme"}


def test_tags_come_from_the_main_section_only() -> None:
    """A snapshot section's tags do not count."""
    lines = [line for line in _scan_lines() if line.startswith("/etc/pve/qemu-server")]
    assert parse_tags(lines) == {"100": ["tenant-other", "web"], "103": ["tenant-initech", "vpn"]}


def test_each_vm_gets_shared_with_other_and_within_bytes() -> None:
    """web1 shares 8 MiB with mail and 200 KiB with vpn, most first; pages become bytes."""
    web1 = _vm(_state(), "100")
    assert web1["shared_with"] == [
        {"pid": 5151, "vmid": "102", "name": "mail", "bytes": 8 * MIB},
        {"pid": 6161, "vmid": "103", "name": "vpn", "bytes": 50 * 4096},
    ]
    assert (web1["shared_with_other_bytes"], web1["merged_within_bytes"]) == (12 * 4096, 400 * 4096)


def test_pool_wins_over_a_tenant_tag() -> None:
    """VM 100 is in pool acme and tagged tenant-other: acme; VM 103 only has the tag."""
    state = _state()
    assert (_vm(state, "100")["tenant"], _vm(state, "100")["tenant_source"]) == ("acme", "pool")
    assert (_vm(state, "103")["tenant"], _vm(state, "103")["tenant_source"]) == ("initech", "tag")


def test_tenant_pairs_sum_their_vm_pairs() -> None:
    """acme with itself: one pair, 8 MiB; acme with initech: two pairs of 50 pages."""
    assert _state()["sharing"]["tenant_pairs"] == [
        {"a": "acme", "b": "acme", "bytes": 8 * MIB, "vm_pairs": 1},
        {"a": "acme", "b": "initech", "bytes": 100 * 4096, "vm_pairs": 2},
    ]


def test_tenant_pairs_leave_out_vms_without_a_tenant() -> None:
    """A pair with a VM of no tenant is in no tenant sum."""
    pairs = [{"a": {"pid": 1}, "b": {"pid": 2}, "bytes": 4096}]
    assert tenant_pairs(pairs, {1: "acme", 2: None}) == []


def test_a_vm_the_scan_could_not_read_has_none_and_its_reason() -> None:
    """A VM that exited mid-scan: its fields None, its error named; the others mapped."""
    lines = [
        "vm pid=6161 error=/proc/6161/pagemap: No such process" if "pid=6161" in line else line
        for line in _scan_lines()
        if not line.endswith(" 6161 50")
    ]
    state = parse_ksm_host(_host_lines())
    apply_scan(state, parse_scan(lines))
    vpn = _vm(state, "103")
    assert vpn["shared_with"] is None and vpn["merged_within_bytes"] is None
    assert vpn["sharing_error"] == "/proc/6161/pagemap: No such process"
    assert _vm(state, "102")["shared_with"][0]["vmid"] == "100"


def test_a_host_level_error_leaves_every_vm_unmapped() -> None:
    """No /proc/kpageflags: the map's error, and no VM figures."""
    state = parse_ksm_host(_host_lines())
    apply_scan(state, parse_scan(["## tenants", "## scan", "error=/proc/kpageflags: No such file"]))
    assert state["sharing"]["error"] == "/proc/kpageflags: No such file"
    assert {vm["shared_with"] is None for vm in state["vms"]} == {True}


@pytest.mark.parametrize(
    "line",
    ["vm pid=12 scanned=1", "pair 1 2", "cpu user=x", "/etc/pve/user.cfg:user:root@pam:1:0:"],
)
def test_a_line_the_scan_cannot_print_fails_the_parse(line: str) -> None:
    lines = ["## tenants", "## scan", line] if not line.startswith("/") else ["## tenants", line]
    with pytest.raises(FactProcessError):
        parse_scan(lines)


def test_the_command_sends_the_script_and_reads_only() -> None:
    """One command: the grep of the tenant marks, then perl -e with the script, page size, pids."""
    command = str(sharing_command(4096, [4242, 5151]))
    assert command.startswith("echo '## tenants'; grep -sH '^pool:' /etc/pve/user.cfg;")
    assert "perl -e '" in command and command.endswith(
        "4096 4242 5151 ; else echo 'error=no perl on the host'; fi"
    )
    shell = command.partition("perl -e")[0]
    assert ">" not in shell.replace(">/dev/null", "")  # no redirection into a file
    opens = re.findall(r"\bopen\(my \$\w+, '([^']*)'|open\(\$\$ref, '([^']*)'", SCAN_SCRIPT)
    assert len(opens) == SCAN_SCRIPT.count("open(") == 4
    assert {mode for pair in opens for mode in pair if mode} == {"<", "<:raw"}  # reads only


# -- through the CLI, against @fake hosts ---------------------------------------------------


def _fake(name: str, scan: list[str] | None = None, **host: Any) -> tuple[str, dict[str, Any]]:
    responses: dict[str, Any] = {}
    if scan is not None:
        responses["echo '## tenants'"] = scan
    responses["echo '## meta'"] = _host_lines()
    return (f"@fake/{name}", {"fake_responses": responses, "fake_delay": 0, **host})


@pytest.fixture
def pve(write_inventory) -> str:
    return write_inventory(f"hosts = {[_fake('pve-a1', _scan_lines())]!r}\n")


def test_cli_json_has_the_map(pve: str) -> None:
    """-o json: per VM shared_with and the host's sharing pairs and tenant pairs."""
    result = runner.invoke(app, ["audit", "-i", pve, "--vms", "--sharing", "-o", "json"])
    audit = json.loads(result.stdout)["hosts"][0]["audit"]
    assert result.exit_code == 1, result.output  # ksmtuned running: exposed
    assert audit["sharing"]["pairs"][0] == {
        "a": {"pid": 4242, "vmid": "100", "name": "web1"},
        "b": {"pid": 5151, "vmid": "102", "name": "mail"},
        "bytes": 8 * MIB,
    }
    assert audit["sharing"]["scanned_bytes"] == 3 * 1572864 * 4096


def test_cli_table_lists_pairs_by_bytes_and_tenant_lines(pve: str) -> None:
    """The pair table, most shared first; then one line per tenant pair."""
    result = runner.invoke(app, ["audit", "-i", pve, "--vms", "--sharing"])
    lines = result.stdout.splitlines()
    start = lines.index("sharing map (distinct physical KSM pages both VMs map):")
    assert [line.split() for line in lines[start + 1 : start + 5]] == [
        ["HOST", "VM", "SHARES", "WITH", "VM", "SHARED"],
        ["@fake/pve-a1", "100", "(web1)", "102", "(mail)", "8.0", "MiB"],
        ["@fake/pve-a1", "100", "(web1)", "103", "(vpn)", "200.0", "KiB"],
        ["@fake/pve-a1", "102", "(mail)", "103", "(vpn)", "200.0", "KiB"],
    ]
    assert "@fake/pve-a1: tenant acme shares 400.0 KiB with tenant initech (2 VM pair(s))" in lines
    assert "@fake/pve-a1: tenant acme shares 8.0 MiB within itself (1 VM pair(s))" in lines


def _pair_gauges(text: str) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["vmid_a"], sample.labels["vmid_b"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "ksm_guard_vm_pair_shared_bytes"
        for sample in family.samples
    }


def test_prometheus_pair_gauges_only_with_sharing(pve: str) -> None:
    """--sharing adds one gauge per VM pair; without it there is none."""
    shared = runner.invoke(app, ["audit", "-i", pve, "--vms", "--sharing", "-o", "prometheus"])
    plain = runner.invoke(app, ["audit", "-i", pve, "--vms", "-o", "prometheus"])
    assert _pair_gauges(shared.stdout) == {
        ("100", "102"): 8 * MIB, ("100", "103"): 50 * 4096, ("102", "103"): 50 * 4096,
    }  # fmt: skip
    assert _pair_gauges(plain.stdout) == {}
    assert "ksm_guard_vm_merged_within_bytes" not in plain.stdout


def test_sharing_without_vms_is_a_usage_error(pve: str) -> None:
    """--sharing alone: exit 2, one line on stderr, nothing on stdout."""
    result = runner.invoke(app, ["audit", "-i", pve, "--sharing"])
    assert result.exit_code == 2
    assert result.stderr == "ksm-guard: --sharing maps the VMs' memory: give it with --vms\n"
    assert result.stdout == ""


def test_non_root_host_gets_one_line_and_exit_3(write_inventory) -> None:
    """A host read as non-root: no scan is sent, one stderr line, exit 3, the audit intact."""
    lines = [("uid=1000" if line == "uid=0" else line) for line in _host_lines()]
    host = ("@fake/pve-a1", {"fake_responses": {"echo '## meta'": lines}, "fake_delay": 0})
    inventory = write_inventory(f"hosts = {[host]!r}\n")
    result = runner.invoke(app, ["audit", "-i", inventory, "--vms", "--sharing", "-o", "json"])
    audit = json.loads(result.stdout)["hosts"][0]["audit"]
    assert result.exit_code == 3
    assert result.stderr == (
        "ksm-guard: @fake/pve-a1: ok: no sharing map: needs root (uid 1000; try --sudo): "
        "pagemap hides PFNs\n"
    )
    assert audit["verdict"] == "ksm-running" and len(audit["vms"]) == 3


def test_report_draws_the_pair_matrix(pve: str, tmp_path: Path) -> None:
    """report --sharing: the page has the matrix, one cell per VM pair and diagonal."""
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["report", "-i", pve, "--out", str(out), "--sharing"])
    page = (out / "report.html").read_text()
    matrix = re.search(r'<svg class="sharing".*?</svg>', page)
    assert result.exit_code == 1, result.output
    assert matrix is not None
    assert matrix.group(0).count("<rect ") == 9
    assert "100 (web1) and 102 (mail) share 8.0 MiB" in matrix.group(0)
    scan = out / "raw" / "_fake_pve-a1.sharing.txt"
    assert scan.read_text().splitlines() == _scan_lines()
    assert f"  raw/{scan.name}" in (out / "SHA256SUMS").read_text()
