"""Verdicts and figures derived from a host's KSM picture (the ``KsmHost`` fact)."""

from __future__ import annotations

from typing import Any

from .facts import UNITS
from .vms import exposure_order

# The order is the order of severity used when several apply to one host.
VERDICTS = (
    "compliant",
    "unsupported",
    "merged-pages-remain",
    "service-enabled",
    "ksm-running",
    "unreachable",
    "error",
)
# Verdicts that count as "not exposed" for the audit exit code.
OK_VERDICTS = ("compliant", "unsupported")
FAILED_VERDICTS = ("unreachable", "error")

ENABLED_STATES = ("enabled", "enabled-runtime", "linked", "linked-runtime")
ACTIVE_STATES = ("active", "activating", "reloading")

DEFAULT_MAX_FRACTION = 0.5


def human_bytes(count: int) -> str:
    """Format a byte count the way an admin reads it: ``1.2 GiB``, ``640.0 KiB``, ``0 B``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def unit_present(unit: dict[str, str] | None) -> bool:
    """A unit is present when systemd knows it, masked included."""
    return unit is not None and unit.get("load", "not-found") != "not-found"


def unit_enabled(unit: dict[str, str] | None) -> bool:
    """The unit starts at boot."""
    return unit is not None and unit_present(unit) and unit.get("unit_file") in ENABLED_STATES


def unit_active(unit: dict[str, str] | None) -> bool:
    """The unit runs now."""
    return unit is not None and unit_present(unit) and unit.get("active") in ACTIVE_STATES


def unit_label(unit: dict[str, str] | None) -> str:
    """``enabled/active``, ``masked/inactive`` or ``absent``."""
    if unit is None or not unit_present(unit):
        return "absent"
    return f"{unit.get('unit_file') or 'unknown'}/{unit.get('active')}"


def merged_page_count(ksm: dict[str, Any]) -> int:
    """Pages still merged: KSM pages, their extra sharers and merged zero pages."""
    return int(
        ksm.get("pages_shared", 0) + ksm.get("pages_sharing", 0) + ksm.get("ksm_zero_pages", 0)
    )


def unmerge_need_bytes(fact: dict[str, Any]) -> int:
    """Memory an unmerge must find: ``(pages_sharing + ksm_zero_pages) x page size``."""
    ksm = fact.get("ksm") or {}
    pages = ksm.get("pages_sharing", 0) + ksm.get("ksm_zero_pages", 0)
    return int(pages * fact["page_size"])


def unmerge_allowed_bytes(fact: dict[str, Any], max_fraction: float) -> int:
    """The most an unmerge may need: ``max_fraction`` of ``MemAvailable``."""
    return int(fact["mem_available"] * max_fraction)


def verdict(fact: dict[str, Any]) -> str:
    """The compliance verdict of one host's KSM picture."""
    ksm = fact.get("ksm")
    if ksm is None:
        return "unsupported"
    if ksm.get("run") == 1:
        return "ksm-running"
    units = fact.get("units") or {}
    if any(unit_enabled(units.get(u)) or unit_active(units.get(u)) for u in UNITS):
        return "service-enabled"
    if merged_page_count(ksm):
        return "merged-pages-remain"
    return "compliant"


def audit_record(
    fact: dict[str, Any], max_fraction: float = DEFAULT_MAX_FRACTION
) -> dict[str, Any]:
    """One host's audit, as the JSON schema documents it (without ``host``)."""
    ksm = fact.get("ksm")
    units = fact.get("units") or {}
    need = unmerge_need_bytes(fact)
    record: dict[str, Any] = {
        "verdict": verdict(fact),
        "ksm_supported": ksm is not None,
        "run": ksm.get("run") if ksm else None,
        "pages_shared": ksm.get("pages_shared", 0) if ksm else 0,
        "pages_sharing": ksm.get("pages_sharing", 0) if ksm else 0,
        "ksm_zero_pages": ksm.get("ksm_zero_pages", 0) if ksm else 0,
        "page_size": fact["page_size"],
        "saved_bytes": need,
        "unmerge_need_bytes": need,
        "mem_available_bytes": fact["mem_available"],
        "mem_total_bytes": fact["mem_total"],
        "unmerge_safe": need <= unmerge_allowed_bytes(fact, max_fraction),
        "uid": fact["uid"],
        "systemd": fact["systemd"],
        "units": {
            name: {
                "present": unit_present(units.get(name)),
                "unit_file": (units.get(name) or {}).get("unit_file") or None,
                "active": (units.get(name) or {}).get("active") or None,
            }
            for name in UNITS
        },
        "boot_persistence": fact["persist"],
        "qemu_server": fact.get("qemu_server"),
        "vms": sorted((dict(vm) for vm in fact.get("vms") or []), key=exposure_order),
    }
    return record


def record_unit_state(unit: dict[str, Any]) -> str:
    """A unit of an audit record as ``enabled/active``, ``masked/inactive`` or ``absent``."""
    return f"{unit['unit_file'] or '?'}/{unit['active']}" if unit["present"] else "absent"


def audit_line(record: dict[str, Any]) -> str:
    """One sentence summing up an audit record."""
    if record["verdict"] == "unsupported":
        return "unsupported: the kernel has no KSM"
    units = ", ".join(f"{name} {record_unit_state(u)}" for name, u in record["units"].items())
    return (
        f"{record['verdict']}: run={record['run']}, pages_shared={record['pages_shared']}, "
        f"pages_sharing={record['pages_sharing']}, saved {human_bytes(record['saved_bytes'])}; "
        f"{units if record['systemd'] else 'no systemd'}"
    )
