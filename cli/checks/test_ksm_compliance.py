"""
KSM compliance, checked with testinfra and nothing of ksm-guard's own: read-only, no root needed.

    ksm-guard verify -i inventories/prod.py --junit-xml ksm.xml
    pytest cli/checks --hosts=paramiko://root@pve-a1,local:// -p no:cacheprovider
"""

from __future__ import annotations

from typing import Any

import pytest

KSM = "/sys/kernel/mm/ksm"
UNITS = ("ksmtuned.service", "ksm.service")
PERSIST_PATH = "/etc/tmpfiles.d/ksm-guard.conf"
PERSIST_LINE = f"w {KSM}/run - - - - 0"


def _ksm_value(host: Any, name: str) -> int:
    if not host.file(KSM).is_directory:
        pytest.skip("the kernel has no KSM: nothing can merge")
    return int(host.file(f"{KSM}/{name}").content_string.strip())


def _unit_property(host: Any, unit: str, name: str) -> str:
    if not host.file("/run/systemd/system").is_directory:
        pytest.skip("systemd is not running: no units to check")
    return str(host.service(unit).systemd_properties.get(name, ""))


@pytest.mark.control("KSM-1")
def test_ksm_is_not_merging(host: Any) -> None:
    """run has its merge bit clear (mm/ksm.c KSM_RUN_MERGE, 1): ksmd merges nothing."""
    assert _ksm_value(host, "run") & 1 == 0


@pytest.mark.control("KSM-3")
def test_no_pages_shared(host: Any) -> None:
    """pages_shared reads 0: no KSM page is left."""
    assert _ksm_value(host, "pages_shared") == 0


@pytest.mark.control("KSM-3")
def test_no_pages_sharing(host: Any) -> None:
    """pages_sharing reads 0: no page is shared between processes."""
    assert _ksm_value(host, "pages_sharing") == 0


@pytest.mark.control("KSM-2")
@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_not_enabled(host: Any, unit: str) -> None:
    """The unit does not start at boot (disabled, masked or not installed)."""
    assert _unit_property(host, unit, "UnitFileState") not in (
        "enabled", "enabled-runtime", "linked", "linked-runtime",
    )  # fmt: skip


@pytest.mark.control("KSM-2")
@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_not_running(host: Any, unit: str) -> None:
    """The unit is not running."""
    assert _unit_property(host, unit, "ActiveState") not in ("active", "activating", "reloading")


@pytest.mark.control("KSM-4")
def test_run_0_is_written_at_boot(host: Any) -> None:
    """systemd-tmpfiles writes run=0 at boot (ksm-guard's persistence file is in place)."""
    _unit_property(host, "systemd-tmpfiles-setup.service", "Id")
    _ksm_value(host, "run")
    persist = host.file(PERSIST_PATH)
    assert persist.exists and PERSIST_LINE in persist.content_string.splitlines()
