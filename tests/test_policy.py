"""The strict policy, waivers, control IDs and locked VMs: from the pure core to the CLI."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.operations.controls import CONTROLS
from ksm_guard.operations.model import (
    HostState,
    Mode,
    Options,
    Policy,
    SettingsError,
    Status,
    Verdict,
    Waiver,
    settings_from_data,
)
from ksm_guard.operations.plan import plan
from ksm_guard.operations.report import audit_record, verdict

FACTS = Path(__file__).parent / "facts" / "facts.KsmHost"
runner = CliRunner()
WAIVER = {"reason": "tenant-owned host, KSM wanted", "approved_by": "ciso", "expires": "2031-01-31"}


def _fact(name: str) -> HostState:
    return cast(HostState, yaml.safe_load((FACTS / f"{name}.yaml").read_text())["fact"])


def _switched_off(state: HostState) -> HostState:
    """The same node with KSM off host-wide: run=0, units disabled, nothing merged."""
    assert state["ksm"] is not None
    state["ksm"].update(run=0, pages_shared=0, pages_sharing=0, ksm_zero_pages=0)
    for unit in state["units"].values():
        if unit["load"] != "not-found":
            unit["unit_file"], unit["active"] = "disabled", "inactive"
    return state


def test_control_ids_are_stable() -> None:
    """The documented IDs, in order: auditors map them; they are never renumbered."""
    assert [control.id for control in CONTROLS] == [f"KSM-{n}" for n in range(1, 7)]


def test_strict_fails_a_node_whose_vms_keep_ksm_allowed() -> None:
    """KSM off host-wide on a PVE 9 node: host policy compliant, strict vm-ksm-allowed (KSM-5)."""
    state = _switched_off(_fact("pve9_vms_kernel_6_8"))
    assert verdict(state, Policy.HOST) == Verdict.COMPLIANT
    assert verdict(state, Policy.STRICT) == Verdict.VM_KSM_ALLOWED
    record = audit_record(state, Options(policy=Policy.STRICT))
    assert "KSM-5" in record["failed_controls"]
    assert record["per_vm_rule"] == "applied"


def test_strict_with_every_vm_opted_out_but_one_restart_pending() -> None:
    """Every VM configured with allow-ksm 0, one still running with KSM: vm-restart-pending."""
    state = _switched_off(_fact("pve9_vms_kernel_6_8"))
    for config in state["pve_configs"].values():
        config["allow_ksm"] = False
    pending = [vm for vm in state["vms"] if vm["restart_pending"]]
    assert pending, "the fixture has a VM waiting for a stop/start"
    assert verdict(state, Policy.STRICT) == Verdict.VM_RESTART_PENDING
    for vm in state["vms"]:
        vm["restart_pending"] = False
    assert verdict(state, Policy.STRICT) == Verdict.COMPLIANT


def test_templates_are_not_asked_to_opt_out() -> None:
    """A template with allow-ksm 1 does not fail KSM-5 (it never runs as itself)."""
    state = _switched_off(_fact("pve9_locked_template_memory"))
    for vmid, config in state["pve_configs"].items():
        config["allow_ksm"] = config["template"]
        assert vmid  # every config is looked at
    for vm in state["vms"]:
        vm["restart_pending"] = False
    assert verdict(state, Policy.STRICT) == Verdict.COMPLIANT


@pytest.mark.parametrize(
    "fixture", ["debian12_ksmtuned_running", "pve8_kernel_6_1_missing_pid_file"]
)
def test_strict_equals_host_where_no_per_vm_opt_out_exists(fixture: str) -> None:
    """Plain Debian or PVE 8: strict is host policy, and the JSON says why."""
    state = _switched_off(_fact(fixture))
    record = audit_record(state, Options(policy=Policy.STRICT))
    assert record["verdict"] == verdict(state, Policy.HOST)
    assert record["per_vm_rule"].startswith("no per-VM opt-out here")


def test_an_active_waiver_turns_an_exposed_host_waived() -> None:
    """Through its expiry date (inclusive) the host reads waived; the real verdict is kept."""
    state = _fact("debian12_ksmtuned_running")
    waiver = Waiver("lab host", "ciso", date(2026, 12, 31))
    record = audit_record(state, Options(waiver=waiver), today=date(2026, 12, 31))
    assert (record["verdict"], record["verdict_unwaived"]) == ("waived", "ksm-running")
    assert record["waiver"] == {
        "reason": "lab host", "approved_by": "ciso", "expires": "2026-12-31", "active": True,
    }  # fmt: skip
    assert not Verdict(record["verdict"]).exposed


def test_an_expired_waiver_reports_the_host_as_it_is() -> None:
    """The day after expiry: the real verdict, with the waiver shown as expired."""
    state = _fact("debian12_ksmtuned_running")
    waiver = Waiver("lab host", "ciso", date(2026, 12, 31))
    record = audit_record(state, Options(waiver=waiver), today=date(2027, 1, 1))
    assert record["verdict"] == "ksm-running"
    assert record["waiver"] is not None and record["waiver"]["active"] is False


def test_changing_modes_skip_a_waived_host_unless_told() -> None:
    """disable plans nothing for a waived host (waived); --ignore-waivers plans it as usual."""
    state = _fact("debian12_ksmtuned_running")
    waiver = Waiver("lab host", "ciso", date(2030, 1, 1))
    waived = plan(state, Mode.DISABLE, Options(waiver=waiver), today=date(2026, 12, 2))
    assert (waived.status, waived.steps) == (Status.WAIVED, ())
    told = plan(state, Mode.DISABLE, Options(waiver=waiver, ignore_waivers=True))
    assert told.status == Status.WOULD_CHANGE
    expired = plan(state, Mode.DISABLE, Options(waiver=waiver), today=date(2030, 1, 2))
    assert expired.status == Status.WOULD_CHANGE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"reason": "x", "approved_by": "y"}, "ksm_waiver must be"),
        ({"reason": "x", "approved_by": "y", "expires": "31/01/2031"}, "must be a date"),
        ({"reason": " ", "approved_by": "y", "expires": "2031-01-31"}, "needs a reason"),
        ("not json", "ksm_waiver must be"),
    ],
)
def test_a_malformed_waiver_is_bad_host_data(value: object, message: str) -> None:
    """A waiver missing a field, with a bad date or no reason: a clear settings error."""
    with pytest.raises(SettingsError, match=message):
        settings_from_data({"ksm_waiver": value})


def test_a_waiver_given_as_json_text_reads_like_a_dict() -> None:
    """``--data ksm_waiver='{...}'`` on pyinfra's command line gives the same waiver."""
    _, from_text = settings_from_data({"ksm_waiver": json.dumps(WAIVER)})
    _, from_dict = settings_from_data({"ksm_waiver": WAIVER})
    assert (
        from_text.waiver == from_dict.waiver == Waiver(WAIVER["reason"], "ciso", date(2031, 1, 31))
    )


def _local(write_inventory: Any, **data: object) -> str:
    return str(write_inventory(f"hosts = [('@local', {data!r})]\n"))


@pytest.mark.parametrize("flag", ["--dry-run", "--yes"])
def test_a_waived_host_is_left_alone_in_dry_and_real_runs(flag: str, write_inventory: Any) -> None:
    """disable on a waived host: status waived, exit 0, the reason on stderr; both runs alike."""
    result = runner.invoke(
        app, ["disable", flag, "-i", _local(write_inventory, ksm_waiver=WAIVER), "-o", "json"]
    )
    host = json.loads(result.stdout)["hosts"][0]
    assert (result.exit_code, host["status"]) == (0, "waived"), result.output
    assert "tenant-owned host, KSM wanted" in host["detail"]
    assert "approved by ciso" in result.stderr


@pytest.mark.parametrize("flag", ["--dry-run", "--yes"])
def test_a_malformed_waiver_refuses_the_host(flag: str, write_inventory: Any) -> None:
    """A waiver without its expiry: refused as bad settings, exit 1, in dry and real runs."""
    broken = {"reason": "x", "approved_by": "y"}
    inventory = _local(write_inventory, ksm_waiver=broken)
    result = runner.invoke(app, ["disable", flag, "-i", inventory, "-o", "json"])
    host = json.loads(result.stdout)["hosts"][0]
    assert (result.exit_code, host["status"]) == (1, "refused")
    assert host["refusal"]["code"] == "bad-settings"


def test_audit_json_carries_policy_controls_and_the_prometheus_gauges(write_inventory: Any) -> None:
    """--policy strict: the JSON has the policy and every control; the gauges carry the IDs."""
    inventory = _local(write_inventory)
    document = json.loads(
        runner.invoke(app, ["audit", "-i", inventory, "--policy", "strict", "-o", "json"]).stdout
    )
    audit = document["hosts"][0]["audit"]
    assert audit["policy"] == "strict"
    assert [control["id"] for control in audit["controls"]] == [c.id for c in CONTROLS]
    metrics = runner.invoke(app, ["audit", "-i", inventory, "-o", "prometheus"]).stdout
    passed = {
        sample.labels["control"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "ksm_guard_control_passed"
        for sample in family.samples
    }
    expected = {c["id"]: float(c["result"] == "pass") for c in audit["controls"]}
    applicable = {key: value for key, value in expected.items() if key in passed}
    assert passed == applicable and set(passed) >= {"KSM-1", "KSM-2", "KSM-3"}


def test_locked_vms_make_a_partial_plan_that_counts_as_refused(write_inventory: Any) -> None:
    """vm-optout --dry-run, locked VMs: the rest would change, the locked are skipped; exit 1."""
    output = yaml.safe_load((FACTS / "pve9_locked_template_memory.yaml").read_text())["output"]
    host = ("@fake/pve-l1", {"fake_responses": {"echo '## meta'": output}, "fake_delay": 0})
    inventory = write_inventory(f"hosts = [{host!r}]\n")
    result = runner.invoke(app, ["vm-optout", "--dry-run", "-i", inventory, "-o", "json"])
    found = json.loads(result.stdout)["hosts"][0]
    assert result.exit_code == 1, result.output
    assert found["status"] == "would-change"
    assert found["skipped"] == ["VM 100 (lock: backup)", "VM 104 (lock: suspended)"]
