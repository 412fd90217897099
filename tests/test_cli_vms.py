"""Per-VM audit, vm-optout and the Prometheus output, through the CLI against @fake hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from ksm_guard.cli.app import app

runner = CliRunner()
FACTS = Path(__file__).parent / "facts" / "facts.KsmHost"


def _output(fixture: str, **replace: str) -> list[str]:
    """A captured or hand-made KsmHost output, with whole lines replaced."""
    lines = yaml.safe_load((FACTS / fixture).read_text())["output"]
    return [replace.get(line, line) for line in lines]


def _fake(name: str, output: list[str]) -> tuple[str, dict[str, Any]]:
    """An @fake host that answers the KsmHost command with ``output``."""
    return (f"@fake/{name}", {"fake_responses": {"echo '## meta'": output}, "fake_delay": 0})


@pytest.fixture
def pve_inventory(write_inventory) -> str:
    """A Proxmox VE 9 node with three running VMs, and a plain QEMU host."""
    hosts = [
        _fake("pve-a1", _output("pve9_vms_kernel_6_8.yaml")),
        _fake("kvm-b1", _output("qemu_no_pve_ksm_stat_versions.yaml")),
    ]
    return write_inventory(f"hosts = {hosts!r}\n")


def _metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Parsed exposition text: metric name → {sorted labels: value}."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge"
        assert family.documentation
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_audit_vms_table_sorts_by_exposure(pve_inventory: str) -> None:
    """--vms lists every running VM, most merged memory first, with allow-ksm and restarts."""
    result = runner.invoke(app, ["audit", "-i", pve_inventory, "--vms"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("HOST  ") and "VMID" in line)
    rows = [line.split() for line in lines[start + 1 : start + 6]]
    assert [(row[0], row[1], row[2], row[4], row[5]) for row in rows] == [
        ("@fake/pve-a1", "100", "web1", "160.0", "MiB"),
        ("@fake/pve-a1", "102", "mail", "43.0", "MiB"),
        ("@fake/kvm-b1", "-", "tenant,a", "1.2", "MiB"),
        ("@fake/kvm-b1", "-", "-", "0", "B"),
        ("@fake/pve-a1", "103", "vpn", "0", "B"),
    ]
    assert [row[-2:] for row in rows[:2]] == [["yes", "no"], ["no", "yes"]]
    assert "@fake/pve-a1: stop/start VM 102 for allow-ksm to apply" in lines


def test_audit_table_without_vms_has_no_vm_table(pve_inventory: str) -> None:
    """Without --vms the table stays the host table."""
    result = runner.invoke(app, ["audit", "-i", pve_inventory])
    assert "VMID" not in result.stdout
    assert "2 host(s):" in result.stdout


def test_audit_json_carries_the_vm_records(pve_inventory: str) -> None:
    """JSON (still schema_version 1) has audit.qemu_server and audit.vms, most exposed first."""
    result = runner.invoke(app, ["audit", "-i", pve_inventory, "-o", "json"])
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    audit = {h["host"]: h["audit"] for h in document["hosts"]}["@fake/pve-a1"]
    assert audit["qemu_server"] == "9.0.27"
    assert [(vm["vmid"], vm["merged_bytes"], vm["allow_ksm"], vm["restart_pending"])
            for vm in audit["vms"]] == [
        ("100", 40960 * 4096, True, False),
        ("102", 11000 * 4096, False, True),
        ("103", 0, False, False),
    ]  # fmt: skip
    assert set(audit["vms"][0]) == {
        "pid", "vmid", "name", "uuid", "merged_pages", "merged_bytes", "ksm_zero_pages",
        "mem_merge", "allow_ksm", "restart_pending", "rss_bytes", "configured_bytes", "error",
    }  # fmt: skip


def test_prometheus_output_parses_back_metric_by_metric(
    pve_inventory: str, write_inventory
) -> None:
    """--output prometheus is valid exposition text with the documented metrics and labels."""
    result = runner.invoke(app, ["audit", "-i", pve_inventory, "-o", "prometheus"])
    assert result.exit_code == 1, result.output
    metrics = _metrics(result.stdout)
    pve, plain = (("host", "@fake/pve-a1"),), (("host", "@fake/kvm-b1"),)
    assert metrics["ksm_guard_up"] == {pve: 1, plain: 1}
    assert metrics["ksm_guard_run"] == {pve: 1, plain: 0}
    assert metrics["ksm_guard_pages_sharing"] == {pve: 52000, plain: 0}
    assert metrics["ksm_guard_saved_bytes"] == {pve: 52000 * 4096, plain: 0}
    assert metrics["ksm_guard_compliant"] == {pve: 0, plain: 0}  # ksmtuned runs on both
    assert metrics["ksm_guard_unit_active"] == {
        (("host", "@fake/pve-a1"), ("unit", "ksmtuned.service")): 1,
        (("host", "@fake/pve-a1"), ("unit", "ksm.service")): 0,
        (("host", "@fake/kvm-b1"), ("unit", "ksmtuned.service")): 1,
        (("host", "@fake/kvm-b1"), ("unit", "ksm.service")): 0,
    }
    assert metrics["ksm_guard_vm_merged_bytes"] == {
        (("host", "@fake/pve-a1"), ("name", "web1"), ("vmid", "100")): 40960 * 4096,
        (("host", "@fake/pve-a1"), ("name", "mail"), ("vmid", "102")): 11000 * 4096,
        (("host", "@fake/pve-a1"), ("name", "vpn"), ("vmid", "103")): 0,
        (("host", "@fake/kvm-b1"), ("name", "tenant,a"),
         ("vmid", "0b9a4f52-8d1e-4c1b-a8a2-5f3d2e1c0b9a")): 300 * 4096,
        (("host", "@fake/kvm-b1"), ("name", ""), ("vmid", "pid-901")): 0,
    }  # fmt: skip
    assert metrics["ksm_guard_vm_restart_pending"] == {
        (("host", "@fake/pve-a1"), ("name", "web1"), ("vmid", "100")): 0,
        (("host", "@fake/pve-a1"), ("name", "mail"), ("vmid", "102")): 1,
        (("host", "@fake/pve-a1"), ("name", "vpn"), ("vmid", "103")): 0,
    }


def test_prometheus_escapes_label_values(write_inventory) -> None:
    """A VM name with quotes and backslashes survives the round trip; @local is the hostname."""
    import socket

    weird = '/proc/900/cmdline:/usr/bin/qemu-system-x86_64\t-name\twe"ird\\vm\t'
    fixture = "qemu_no_pve_ksm_stat_versions.yaml"
    cmdline = next(line for line in _output(fixture) if "/900/cmdline" in line)
    path = write_inventory(f"hosts = {[_fake('odd', _output(fixture, **{cmdline: weird}))]!r}\n")
    result = runner.invoke(app, ["audit", "-i", path, "-o", "prometheus"])
    names = {
        dict(labels)["name"] for labels in _metrics(result.stdout)["ksm_guard_vm_merged_bytes"]
    }
    assert names == {'we"ird\\vm', ""}
    local = runner.invoke(app, ["audit", "-o", "prometheus"])
    assert _metrics(local.stdout)["ksm_guard_up"] == {(("host", socket.gethostname()),): 1}


def test_textfile_dir_writes_the_prom_file_atomically(pve_inventory: str, tmp_path: Path) -> None:
    """--textfile-dir leaves exactly ksm_guard.prom (no temp file), parseable; stdout unchanged."""
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    result = runner.invoke(app, ["audit", "-i", pve_inventory, "--textfile-dir", str(textfiles)])
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in textfiles.iterdir()) == ["ksm_guard.prom"]
    text = (textfiles / "ksm_guard.prom").read_text()
    assert (
        _metrics(text)["ksm_guard_vm_merged_bytes"][
            (("host", "@fake/pve-a1"), ("name", "web1"), ("vmid", "100"))
        ]
        == 40960 * 4096
    )
    assert (textfiles / "ksm_guard.prom").stat().st_mode & 0o777 == 0o644
    assert result.stdout.startswith("HOST ")


def test_textfile_write_failure_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename fails, the previous .prom file stays as it was and the temp file is gone."""
    from ksm_guard.cli import prometheus

    (tmp_path / "ksm_guard.prom").write_text("old\n")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(prometheus.os, "replace", broken)
    with pytest.raises(OSError, match="disk on fire"):
        prometheus.write_textfile(tmp_path, "ksm_guard_up 1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["ksm_guard.prom"]
    assert (tmp_path / "ksm_guard.prom").read_text() == "old\n"


def test_textfile_dir_must_exist(tmp_path: Path) -> None:
    """A missing --textfile-dir is a usage error: exit 2, nothing audited."""
    result = runner.invoke(app, ["audit", "--textfile-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "--textfile-dir" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("vmid", ["42", "web1", "1000000000"])
def test_vm_optout_rejects_bad_vmids(vmid: str) -> None:
    """--vmid must be a Proxmox VMID: exit 2 before anything is contacted."""
    result = runner.invoke(app, ["vm-optout", "--dry-run", "--vmid", vmid])
    assert result.exit_code == 2
    assert "--vmid" in result.stderr
    assert result.stdout == ""


def test_vm_optout_without_yes_off_a_terminal_is_refused() -> None:
    """vm-optout changes hosts: off a terminal it wants --yes."""
    result = runner.invoke(app, ["vm-optout"])
    assert result.exit_code == 2
    assert "refusing to vm-optout without confirmation" in result.stderr


def test_vm_optout_dry_run_shows_the_diff(pve_inventory: str) -> None:
    """The dry run names each VM to opt out, and says it keeps KSM until a stop/start."""
    result = runner.invoke(
        app,
        ["vm-optout", "-i", pve_inventory, "--limit", "@fake/pve-a1", "--dry-run", "-o", "json"],
    )
    document = json.loads(result.stdout)
    host = document["hosts"][0]
    assert (document["dry_run"], host["status"], result.exit_code) == (True, "would-change", 0)
    assert host["changes"] == ["VM 100 (web1): allow-ksm 1 → 0; runs with KSM until a stop/start"]


def test_vm_optout_off_proxmox_is_refused(pve_inventory: str) -> None:
    """A plain QEMU host is told it is not Proxmox VE: refused, exit 1."""
    result = runner.invoke(
        app, ["vm-optout", "-i", pve_inventory, "--limit", "@fake/kvm-b1", "--yes", "-o", "json"]
    )
    host = json.loads(result.stdout)["hosts"][0]
    assert (host["status"], result.exit_code) == ("refused", 1)
    assert host["detail"].startswith("vm-optout not supported: not a Proxmox VE host")


def test_vm_optout_vmid_limits_the_change(pve_inventory: str) -> None:
    """--vmid 102 (already allow-ksm 0, pending): nothing to change on that node."""
    result = runner.invoke(
        app, ["vm-optout", "-i", pve_inventory, "--limit", "@fake/pve-a1", "--vmid", "102",
              "--dry-run", "-o", "json"],
    )  # fmt: skip
    host = json.loads(result.stdout)["hosts"][0]
    assert (host["status"], host["changes"], result.exit_code) == ("ok", [], 0)


def test_vm_optout_on_old_qemu_server_is_refused(write_inventory) -> None:
    """qemu-server 8.x has no allow-ksm: refused with the version and the way out, exit 1."""
    output = _output(
        "pve9_vms_kernel_6_8.yaml", **{"qemu_server=ii |9.0.27": "qemu_server=ii |8.3.14"}
    )
    path = write_inventory(f"hosts = {[_fake('pve8', output)]!r}\n")
    result = runner.invoke(app, ["vm-optout", "-i", path, "--yes", "-o", "json"])
    host = json.loads(result.stdout)["hosts"][0]
    assert result.exit_code == 1
    assert host["status"] == "refused"
    assert "qemu-server 8.3.14 has no allow-ksm (needs 9.0.27 or later" in host["detail"]
    assert "vm-optout not supported" in result.stderr


def test_a_reloading_unit_is_active_in_the_metrics_as_in_the_verdict() -> None:
    """systemd's ``reloading`` counts as running for the gauge and for the verdict alike."""
    from ksm_guard.cli import prometheus
    from ksm_guard.cli.engine import HostResult, RunResult
    from ksm_guard.operations.model import Mode, Status
    from ksm_guard.operations.report import audit_record

    facts = Path(__file__).parent / "facts/facts.KsmHost/masked_and_persisted.yaml"
    state = yaml.safe_load(facts.read_text())["fact"]
    state["units"]["ksmtuned.service"].update(unit_file="disabled", active="reloading")
    audit = audit_record(state)
    result = RunResult(Mode.AUDIT, False, [HostResult("n1", Status.OK, audit=audit)])
    samples = {
        sample.labels.get("unit"): sample.value
        for family in text_string_to_metric_families(prometheus.render(result))
        if family.name == "ksm_guard_unit_active"
        for sample in family.samples
    }
    assert audit["verdict"] == "service-enabled"
    assert samples == {"ksmtuned.service": 1.0, "ksm.service": 0.0}
