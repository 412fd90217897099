"""
ksm-guard plan on this machine's real KSM: unsafe exactly when unmerge --dry-run is refused; and
unmerge --order plan over this machine under several names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from tests.conftest import ksm_guard
from tests.localssh import LocalSshd, inventory_source
from tests.results import hosts_of
from tests.test_real_ksm import pytestmark as real_ksm

pytestmark = [*real_ksm, pytest.mark.usefixtures("merged_pages")]


@pytest.mark.parametrize("fraction", ["0.000001", "1"])
def test_plan_is_unsafe_exactly_when_unmerge_is_refused(fraction: str, tmp_path: Path) -> None:
    """
    With pages merged here and the host's ksm_max_fraction tiny (or 1), plan -i @local calls the
    host unsafe (exit 1) exactly when unmerge --dry-run refuses it as an unsafe unmerge. With
    --min-headroom 0 the preflight alone decides.
    """
    inventory = tmp_path / "local.py"
    inventory.write_text(f"hosts = [('@local', {{'ksm_max_fraction': {fraction}}})]\n")
    plan = ksm_guard("plan", "-i", str(inventory), "--min-headroom", "0", "-o", "json")
    dry = hosts_of(ksm_guard("unmerge", "--dry-run", "-i", str(inventory), "-o", "json"))["@local"]
    capacity = json.loads(plan.stdout)["hosts"][0]["capacity"]
    refused = dry["status"] == "refused" and dry["refusal"]["code"] == "unsafe-unmerge"
    assert capacity["unmerge_need_bytes"] > 0, "the workload's pages must be merged"
    assert capacity["unmerge_max_fraction"] == float(fraction)
    assert capacity["safe"] is (not refused)
    assert plan.returncode == (1 if refused else 0), plan.stderr
    assert refused is (fraction != "1")


def test_unmerge_order_plan_takes_the_safe_hosts_first(
    local_sshd: LocalSshd, write_inventory
) -> None:
    """
    This machine's merged pages under four names over loopback SSH: node1 and node3 allow a tiny
    share of MemAvailable (unmerge refuses them), node2 and node4 all of it. unmerge --dry-run
    --order plan takes node2 and node4 first; node1's refusal then stops it before node3.
    """
    fractions = {"node1": 0.000001, "node2": 1, "node3": 0.000001, "node4": 1}
    hosts = [local_sshd.host(name, ksm_max_fraction=value) for name, value in fractions.items()]
    inventory = write_inventory(inventory_source(hosts))
    result = CliRunner().invoke(
        app, ["unmerge", "--dry-run", "--order", "plan", "-i", inventory, "-o", "json"]
    )
    statuses = [host["status"] for host in hosts_of(result).values()]
    assert result.exit_code == 1, result.output
    assert statuses == ["refused", "would-change", "not-reached", "would-change"]
