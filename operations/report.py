"""Verdicts and figures derived from a host's KSM picture (the ``KsmHost`` fact)."""

from __future__ import annotations

import re
from datetime import date
from typing import Any, NotRequired, TypedDict

from .model import (
    ALLOW_KSM_SINCE,
    KSM_RUN_MERGE,
    KSM_RUN_OFFLINE,
    UNITS,
    ClusterInfo,
    HostState,
    Ksm,
    Options,
    Policy,
    Unit,
    Verdict,
    Vm,
    Waiver,
    utc_today,
)
from .watch import WatchRecord, watch_record

ENABLED_STATES = ("enabled", "enabled-runtime", "linked", "linked-runtime")
ACTIVE_STATES = ("active", "activating", "reloading")


class UnitRecord(TypedDict):
    present: bool
    unit_file: str | None
    active: str | None


class ControlRecord(TypedDict):
    id: str
    title: str
    result: str  # pass, fail, skip
    message: str


class WaiverRecord(TypedDict):
    reason: str
    approved_by: str
    expires: str  # YYYY-MM-DD, the last day it holds (UTC)
    active: bool  # False: expired; the host is reported as what it is


class AuditRecord(TypedDict):
    """One host's audit, as the JSON schema documents it (``audit`` of a host)."""

    verdict: Verdict
    verdict_unwaived: Verdict
    policy: Policy
    per_vm_rule: str  # "applied", or why it did not apply
    controls: list[ControlRecord]
    failed_controls: list[str]
    waiver: WaiverRecord | None
    ksm_supported: bool
    run: int | None
    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int
    page_size: int
    saved_bytes: int
    unmerge_need_bytes: int
    mem_available_bytes: int
    mem_total_bytes: int
    unmerge_max_fraction: float
    unmerge_safe: bool
    uid: int
    systemd: bool
    units: dict[str, UnitRecord]
    boot_persistence: str
    qemu_server: str | None
    vms: list[Vm]
    cluster: ClusterInfo | None  # its Proxmox VE cluster; None: no /etc/pve/.members
    watch: WatchRecord | None  # the drift watch; None: the read had no watch section
    sharing: NotRequired[dict[str, Any]]  # audit --sharing: pairs, tenant pairs (sharing.py)


def human_bytes(count: int) -> str:
    """Format a byte count the way an admin reads it: ``1.2 GiB``, ``640.0 KiB``, ``0 B``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def unit_present(unit: Unit | None) -> bool:
    """A unit is present when systemd knows it, masked included."""
    return unit is not None and unit.get("load", "not-found") != "not-found"


def unit_enabled(unit: Unit | None) -> bool:
    """The unit starts at boot."""
    return unit is not None and unit_present(unit) and unit.get("unit_file") in ENABLED_STATES


def unit_active(unit: Unit | None) -> bool:
    """The unit runs now."""
    return unit is not None and unit_present(unit) and unit.get("active") in ACTIVE_STATES


def unit_label(unit: Unit | None) -> str:
    """``enabled/active``, ``masked/inactive`` or ``absent``."""
    if unit is None or not unit_present(unit):
        return "absent"
    return f"{unit.get('unit_file') or 'unknown'}/{unit.get('active')}"


def counter(ksm: Ksm | None, name: str) -> int:
    """A KSM counter, 0 when this kernel has no such file (or no KSM)."""
    value = (ksm or {}).get(name, 0)
    return value if isinstance(value, int) else 0


def merging(ksm: Ksm | None) -> bool:
    """ksmd merges: ``run`` has the MERGE bit (1, or 5 while memory goes offline)."""
    run = (ksm or {}).get("run")
    return isinstance(run, int) and bool(run & KSM_RUN_MERGE)


def offlining(ksm: Ksm | None) -> bool:
    """Memory is going offline (``run`` has bit 4): a write to ``run`` waits until it is done."""
    run = (ksm or {}).get("run")
    return isinstance(run, int) and bool(run & KSM_RUN_OFFLINE)


def merged_page_count(ksm: Ksm | None) -> int:
    """Pages still merged: KSM pages, their extra sharers and merged zero pages."""
    return sum(counter(ksm, name) for name in ("pages_shared", "pages_sharing", "ksm_zero_pages"))


def unmerge_need_bytes(state: HostState) -> int:
    """Memory an unmerge must find: ``(pages_sharing + ksm_zero_pages) x page size``."""
    pages = counter(state["ksm"], "pages_sharing") + counter(state["ksm"], "ksm_zero_pages")
    return pages * state["page_size"]


def unmerge_allowed_bytes(state: HostState, max_fraction: float) -> int:
    """The most an unmerge may need: ``max_fraction`` of ``MemAvailable``."""
    return int(state["mem_available"] * max_fraction)


def unmerge_safe(state: HostState, max_fraction: float) -> bool:
    """The memory preflight of an unmerge passes (the very test ``unmerge`` refuses by)."""
    return unmerge_need_bytes(state) <= unmerge_allowed_bytes(state, max_fraction)


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a Debian version: ``1:9.0.27+pve1`` → ``(9, 0, 27)``."""
    upstream = version.split(":", 1)[-1]
    match = re.match(r"\d+(?:\.\d+)*", upstream)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def allow_ksm_supported(version: str | None) -> bool:
    """Whether this qemu-server knows ``allow-ksm`` (Proxmox VE 9, 9.0.27 and later)."""
    return version is not None and version_tuple(version) >= ALLOW_KSM_SINCE


def exposure_order(vm: Vm) -> tuple[int, int, int]:
    """Sort key: most merged bytes first, unknown last, then by VMID and pid."""
    merged = vm.get("merged_bytes")
    return (-(merged if merged is not None else -1), int(vm.get("vmid") or 0), vm["pid"])


def verdict(state: HostState, policy: Policy = Policy.HOST) -> Verdict:
    """The compliance verdict of one host's KSM picture: its most severe failed control."""
    from .controls import evaluate, verdict_of

    return verdict_of(evaluate(state, policy), state.get("ksm") is not None)


def _unit_record(unit: Unit | None) -> UnitRecord:
    if unit is None:
        return {"present": False, "unit_file": None, "active": None}
    return {
        "present": unit_present(unit),
        "unit_file": unit.get("unit_file") or None,
        "active": unit.get("active") or None,
    }


def waiver_line(waiver: Waiver) -> str:
    """A waived host's line: why, who approved it, until when."""
    return (
        f"waived until {waiver.expires.isoformat()} (approved by {waiver.approved_by}): "
        f"{waiver.reason}; left as it is (--ignore-waivers to change it)"
    )


def waiver_record(waiver: Waiver | None, today: date) -> WaiverRecord | None:
    if waiver is None:
        return None
    return {
        "reason": waiver.reason,
        "approved_by": waiver.approved_by,
        "expires": waiver.expires.isoformat(),
        "active": waiver.active(today),
    }


def audit_record(
    state: HostState, options: Options | None = None, today: date | None = None
) -> AuditRecord:
    """
    One host's audit under its options: ``unmerge_safe`` by its own ``max_fraction``, the
    verdict by its ``policy`` and, while it holds, its waiver (an exposed host reads ``waived``).
    """
    from .controls import evaluate, per_vm_rule, verdict_of

    options = options or Options()
    max_fraction = options.max_fraction
    ksm = state.get("ksm")
    run = ksm.get("run") if ksm else None
    need = unmerge_need_bytes(state)
    outcomes = evaluate(state, options.policy)
    real = verdict_of(outcomes, ksm is not None)
    waiver = waiver_record(options.waiver, today or utc_today())
    waived = waiver is not None and waiver["active"] and real.exposed
    record: AuditRecord = {
        "verdict": Verdict.WAIVED if waived else real,
        "verdict_unwaived": real,
        "policy": options.policy,
        "per_vm_rule": per_vm_rule(state, options.policy) or "applied",
        "controls": [
            {"id": c.id, "title": c.title, "result": o.result, "message": o.message}
            for c, o in outcomes
        ],
        "failed_controls": [c.id for c, o in outcomes if o.result == "fail"],
        "waiver": waiver,
        "ksm_supported": ksm is not None,
        "run": run if isinstance(run, int) else None,
        "pages_shared": counter(ksm, "pages_shared"),
        "pages_sharing": counter(ksm, "pages_sharing"),
        "ksm_zero_pages": counter(ksm, "ksm_zero_pages"),
        "page_size": state["page_size"],
        "saved_bytes": need,
        "unmerge_need_bytes": need,
        "mem_available_bytes": state["mem_available"],
        "mem_total_bytes": state["mem_total"],
        "unmerge_max_fraction": max_fraction,
        "unmerge_safe": unmerge_safe(state, max_fraction),
        "uid": state["uid"],
        "systemd": state["systemd"],
        "units": {name: _unit_record((state.get("units") or {}).get(name)) for name in UNITS},
        "boot_persistence": state["persist"],
        "qemu_server": state.get("qemu_server"),
        "vms": sorted((Vm(**vm) for vm in state.get("vms") or []), key=exposure_order),
        "cluster": state.get("cluster"),
        "watch": watch_record(state.get("watch")),
    }
    if "sharing" in state:
        record["sharing"] = state["sharing"]
    return record


def record_unit_state(unit: UnitRecord) -> str:
    """A unit of an audit record as ``enabled/active``, ``masked/inactive`` or ``absent``."""
    return f"{unit['unit_file'] or '?'}/{unit['active']}" if unit["present"] else "absent"


def audit_line(record: AuditRecord) -> str:
    """One sentence summing up an audit record."""
    if record["verdict"] == Verdict.UNSUPPORTED:
        return "unsupported: the kernel has no KSM"
    units = ", ".join(f"{name} {record_unit_state(u)}" for name, u in record["units"].items())
    watch = record.get("watch")
    finding = f"; {watch['finding']}" if watch and watch["finding"] else ""
    return (
        f"{record['verdict']}: run={record['run']}, pages_shared={record['pages_shared']}, "
        f"pages_sharing={record['pages_sharing']}, saved {human_bytes(record['saved_bytes'])}; "
        f"{units if record['systemd'] else 'no systemd'}{finding}"
    )
