"""ksm-guard plan on this machine's real KSM: unsafe exactly when unmerge --dry-run is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ksm_guard
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
