"""Verdicts and unmerge figures derived from the KsmHost fact fixtures."""

from pathlib import Path
from typing import cast

import pytest
import yaml

from ksm_guard.operations.model import HostState, Options
from ksm_guard.operations.report import audit_record, human_bytes, verdict

FACTS = Path(__file__).parent / "facts/facts.KsmHost"


def _fact(name: str) -> HostState:
    return cast(HostState, yaml.safe_load((FACTS / f"{name}.yaml").read_text())["fact"])


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("debian12_ksmtuned_running", "ksm-running"),
        ("pve_layout_kernel_6_8", "ksm-running"),
        ("no_ksm_dir", "unsupported"),
        ("masked_and_persisted", "compliant"),
        ("not_installed_non_root", "merged-pages-remain"),
        ("kernel_6_18_no_systemd_captured", "compliant"),
        ("debian_vm_captured", "ksm-running"),
        ("pve_vm_captured", "ksm-running"),
        ("bare_vm_captured", "compliant"),
        ("debian_vm_masked_non_root_captured", "ksm-running"),
        ("run_5_memory_offlining", "ksm-running"),
        ("pve9_one_odd_vm", "ksm-running"),
    ],
)
def test_verdict(fixture: str, expected: str) -> None:
    """Each captured host state maps to its documented verdict."""
    assert verdict(_fact(fixture)) == expected


@pytest.mark.parametrize(
    ("run", "expected"),
    [(0, "merged-pages-remain"), (1, "ksm-running"), (2, "merged-pages-remain"),
     (4, "merged-pages-remain"), (5, "ksm-running"), (6, "merged-pages-remain")],
)  # fmt: skip
def test_verdict_reads_the_merge_bit_of_run(run: int, expected: str) -> None:
    """
    Every value mm/ksm.c can show in run (0-2, with the offline bit 4 while memory goes offline):
    ksmd merges when the MERGE bit (1) is set, so 5 is running and 4 and 6 are not. The units are
    off here, and pages stay merged, so a stopped KSM reads merged-pages-remain.
    """
    fact = _fact("masked_and_persisted")
    assert fact["ksm"] is not None
    fact["ksm"].update(run=run, pages_shared=64, pages_sharing=16320)
    assert verdict(fact) == expected
    assert audit_record(fact)["run"] == run  # the JSON keeps the raw number


def test_enabled_unit_with_run_0_is_service_enabled() -> None:
    """ksmtuned enabled but idle (run=0) still fails: it will switch KSM on again."""
    fact = _fact("debian12_ksmtuned_running")
    assert fact["ksm"] is not None
    fact["ksm"]["run"] = 0
    assert verdict(fact) == "service-enabled"


def test_unmerge_need_counts_zero_pages() -> None:
    """Need = (pages_sharing + ksm_zero_pages) x page size."""
    record = audit_record(_fact("pve_layout_kernel_6_8"))
    assert record["unmerge_need_bytes"] == (262144 + 1024) * 4096


def test_unmerge_safe_against_the_fraction() -> None:
    """1.0 GiB needed against 5.6 GiB available: safe at 50 %, unsafe at 10 %."""
    fact = _fact("pve_layout_kernel_6_8")
    assert audit_record(fact, Options(max_fraction=0.5))["unmerge_safe"] is True
    assert audit_record(fact, Options(max_fraction=0.1))["unmerge_safe"] is False


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (66846720, "63.8 MiB"), (2**40, "1.0 TiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    """Sizes read the way free(1) prints them."""
    assert human_bytes(count) == text
