"""Verdicts and unmerge figures derived from the KsmHost fact fixtures."""

from pathlib import Path
from typing import cast

import pytest
import yaml

from ksm_guard.operations.model import HostState
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
    ],
)
def test_verdict(fixture: str, expected: str) -> None:
    """Each captured host state maps to its documented verdict."""
    assert verdict(_fact(fixture)) == expected


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
    assert audit_record(fact, 0.5)["unmerge_safe"] is True
    assert audit_record(fact, 0.1)["unmerge_safe"] is False


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (66846720, "63.8 MiB"), (2**40, "1.0 TiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    """Sizes read the way free(1) prints them."""
    assert human_bytes(count) == text
