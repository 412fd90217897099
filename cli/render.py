"""Turn a ``RunResult`` into the table or the JSON document that ksm-guard prints on stdout."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ksm_guard.operations.model import Mode, Status
from ksm_guard.operations.report import (
    AuditRecord,
    WaiverRecord,
    exposure_order,
    human_bytes,
    record_unit_state,
)

if TYPE_CHECKING:
    from .engine import HostResult, RunResult

# How a status reads in the notes under the table.
_LABELS = {
    Status.WOULD_CHANGE: "would change",
    Status.OK: "no change",
    Status.NOT_REACHED: "not reached",
}


def _units(audit: AuditRecord) -> str:
    if not audit["systemd"]:
        return "no systemd"
    return " ".join(
        f"{name.removesuffix('.service')}={record_unit_state(unit)}"
        for name, unit in audit["units"].items()
    )


def _row(result: HostResult) -> list[str]:
    audit = result.audit
    if audit is None:
        return [result.host, result.verdict, "-", "-", "-", "-", "-", "-"]
    need = (
        f"{human_bytes(audit['unmerge_need_bytes'])} / {human_bytes(audit['mem_available_bytes'])}"
    )
    return [
        result.host,
        result.verdict,
        "-" if audit["run"] is None else str(audit["run"]),
        str(audit["pages_shared"]),
        str(audit["pages_sharing"]),
        human_bytes(audit["saved_bytes"]),
        need,
        _units(audit),
    ]


def unmerge_figures(figures: dict[str, Any]) -> str:
    """One host's unmerge in a sentence: pages, bytes, seconds, memory in use afterwards."""
    text = (
        f"unmerged {figures['pages']} pages ({human_bytes(figures['bytes'])}) "
        f"in {figures['seconds']:.1f} s"
    )
    if figures.get("memory_used_bytes") is not None:
        text += f"; memory in use now {human_bytes(figures['memory_used_bytes'])}"
    return text


# How a change rollout groups its hosts, in the order of the report.
_ROLLOUT = (
    ("done", (Status.CHANGED, Status.OK)),
    ("refused", (Status.REFUSED,)),
    ("failed", (Status.FAILED,)),
    ("not reached", (Status.NOT_REACHED,)),
    ("waived", (Status.WAIVED,)),
    ("unreachable", (Status.UNREACHABLE, Status.ERROR)),
)


def rollout_line(result: RunResult) -> str:
    """Which hosts a change was done on, refused, failed, not reached or could not reach."""
    parts = []
    for label, statuses in _ROLLOUT:
        names = [host.host for host in result.hosts if host.status in statuses]
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "rollout " + "; ".join(parts)


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def vm_table(result: RunResult) -> list[str]:
    """
    One row per running VM of every host, the most exposed first; then the VMs to restart, and
    what of a VM's files could not be read (its ``error``).
    """
    vms = [(host.host, vm) for host in result.hosts if host.audit for vm in host.audit["vms"]]
    vms.sort(key=lambda item: exposure_order(item[1]))
    header = ["HOST", "VMID", "NAME", "PID", "MERGED", "ALLOW-KSM", "RESTART PENDING"]
    rows = [header] + [
        [
            host,
            vm["vmid"] or "-",
            vm["name"] or "-",
            str(vm["pid"]),
            "?" if vm["merged_bytes"] is None else human_bytes(vm["merged_bytes"]),
            _flag(vm["allow_ksm"]),
            _flag(vm["restart_pending"] if vm["allow_ksm"] is not None else None),
        ]
        for host, vm in vms
    ]
    lines = _columns(rows) if vms else ["no running QEMU VMs"]
    for host in result.hosts:
        vms_of_host = host.audit["vms"] if host.audit else []
        pending = [vm["vmid"] or str(vm["pid"]) for vm in vms_of_host if vm["restart_pending"]]
        if pending:
            lines.append(f"{host.host}: stop/start VM {', '.join(pending)} for allow-ksm to apply")
        lines += [
            f"{host.host}: VM {vm['vmid'] or vm['pid']} partly unread: {vm['error']}"
            for vm in vms_of_host
            if vm.get("error")
        ]
    return lines


def _waiver_note(waiver: WaiverRecord, audit: AuditRecord | None) -> str:
    if not waiver["active"]:
        real = audit["verdict_unwaived"] if audit else "?"
        return f"waiver expired on {waiver['expires']}: reported as it is ({real})"
    return (
        f"waived until {waiver['expires']} (approved by {waiver['approved_by']}): "
        f"{waiver['reason']}"
    )


def _notes(result: RunResult) -> list[str]:
    """Per host: what changes (or would), why it was refused or failed, the unmerge figures."""
    notes = []
    for host in result.hosts:
        if result.mode is Mode.AUDIT:
            if host.detail:
                notes.append(f"{host.host}: {host.detail}")
            waiver = host.audit["waiver"] if host.audit else None
            if waiver is not None:
                notes.append(f"{host.host}: {_waiver_note(waiver, host.audit)}")
            watch = host.audit.get("watch") if host.audit else None
            if watch and watch["finding"]:
                notes.append(f"{host.host}: {watch['finding']}")
            continue
        notes.append(f"{host.host}: {_LABELS.get(host.status, host.status.value)}")
        notes.extend(f"  {change}" for change in host.changes)
        notes.extend(f"  skipped: {item}" for item in host.skipped)
        if host.unmerge:
            notes.append(f"  {unmerge_figures(host.unmerge)}")
        if host.detail:
            notes.append(f"  {host.detail}")
    return notes


def _summary(result: RunResult) -> str:
    """``3 host(s): 2 compliant, 1 ksm-running; 1 would change, 1 refused, 1 ok; exit 1``."""
    counts = result.summary()
    what = ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items()))
    if result.mode is not Mode.AUDIT:
        statuses: dict[str, int] = {}
        for host in result.hosts:
            label = _LABELS.get(host.status, host.status.value)
            statuses[label] = statuses.get(label, 0) + 1
        what += "; " + ", ".join(f"{count} {label}" for label, count in statuses.items())
    return f"{len(result.hosts)} host(s): {what}; exit {result.exit_code}"


def _report(result: RunResult, vms: bool) -> list[str]:
    header = ["HOST", "VERDICT", "RUN", "SHARED", "SHARING", "SAVED", "UNMERGE NEED / AVAIL"]
    lines = _columns([[*header, "UNITS"]] + [_row(h) for h in result.hosts])
    if vms or result.mode is Mode.VM_OPTOUT:
        lines += ["", *vm_table(result)]
    if vms:
        from .sharing_render import sharing_table

        sharing = sharing_table(result)
        lines += ["", *sharing] if sharing else []
    notes = _notes(result)
    return [*lines, "", *notes] if notes else lines


def table(result: RunResult, vms: bool = False) -> str:
    """A plain-text report: one row per host, then changes and problems, then a summary line."""
    lines = _report(result, vms)
    if result.declined:
        footer = f"declined, nothing changed; {_summary(result)}"
    elif result.dry_run:
        footer = f"dry run, nothing changed; {_summary(result)}"
    else:
        if result.mode is not Mode.AUDIT:
            lines += ["", rollout_line(result)]
        footer = _summary(result)
    return "\n".join([*lines, "", footer])


def plan_text(result: RunResult) -> str:
    """What the confirmation prompt shows: the current verdicts and the plan, host by host."""
    lines = _report(result, vms=False)
    counts = {status: 0 for status in (Status.WOULD_CHANGE, Status.REFUSED, Status.OK)}
    for host in result.hosts:
        if host.status in counts:
            counts[host.status] += 1
    unread = len(result.hosts) - sum(counts.values())
    parts = [
        f"{counts[Status.WOULD_CHANGE]} would change",
        f"{counts[Status.REFUSED]} refused",
        f"{counts[Status.OK]} no change",
        *([f"{unread} unreachable or unreadable"] if unread else []),
    ]
    return "\n".join(
        [*lines, "", f"plan for {result.mode}: {', '.join(parts)}; nothing changed yet"]
    )


def _refusal(host: HostResult) -> dict[str, Any] | None:
    if host.refusal is None:
        return None
    refusal = host.refusal
    return {"code": refusal.code, "reason": refusal.reason, "figures": dict(refusal.figures)}


def document(result: RunResult) -> dict[str, Any]:
    """The documented JSON document (``schema_version`` 1) as a dict."""
    from .engine import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "mode": result.mode,
        "dry_run": result.dry_run,
        "declined": result.declined,
        "exit_code": result.exit_code,
        "summary": result.summary(),
        "hosts": [
            {
                "host": host.host,
                "verdict": host.verdict,
                "status": host.status,
                "detail": host.detail,
                "changes": host.changes,
                "refusal": _refusal(host),
                "skipped": host.skipped,
                "unmerge": host.unmerge,
                "audit": host.audit,
            }
            for host in result.hosts
        ],
    }


def as_json(result: RunResult) -> str:
    """The documented JSON document (``schema_version`` 1)."""
    return json.dumps(document(result), indent=2, sort_keys=False)
