"""Turn a ``RunResult`` into the table or the JSON document that ksm-guard prints on stdout."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from operations.report import human_bytes, record_unit_state

if TYPE_CHECKING:
    from .engine import HostResult, RunResult


def _units(audit: dict[str, Any]) -> str:
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
    ("done", ("changed", "ok")),
    ("refused", ("refused",)),
    ("failed", ("failed",)),
    ("not reached", ("not-reached",)),
    ("unreachable", ("unreachable", "error")),
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
    """One row per running VM of every host, the most exposed first; then VMs to restart."""
    from operations.vms import exposure_order

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
        pending = [vm["vmid"] for vm in (host.audit or {}).get("vms", []) if vm["restart_pending"]]
        if pending:
            lines.append(f"{host.host}: stop/start VM {', '.join(pending)} for allow-ksm to apply")
    return lines


def table(result: RunResult, vms: bool = False) -> str:
    """A plain-text report: one row per host, then changes and problems, then a summary line."""
    header = [
        "HOST",
        "VERDICT",
        "RUN",
        "SHARED",
        "SHARING",
        "SAVED",
        "UNMERGE NEED / AVAIL",
        "UNITS",
    ]
    lines = _columns([header] + [_row(h) for h in result.hosts])
    if vms or result.mode == "vm-optout":
        lines += ["", *vm_table(result)]

    notes = []
    for host in result.hosts:
        if result.mode != "audit":
            label = {
                "would-change": "would change",
                "ok": "no change",
                "not-reached": "not reached",
            }.get(host.status, host.status)
            notes.append(f"{host.host}: {label}")
            notes.extend(f"  {change}" for change in host.changes)
            if host.unmerge:
                notes.append(f"  {unmerge_figures(host.unmerge)}")
        if host.detail:
            notes.append(
                f"{host.host}: {host.detail}" if result.mode == "audit" else f"  {host.detail}"
            )
    if notes:
        lines.append("")
        lines.extend(notes)

    if result.mode != "audit" and not result.dry_run:
        lines.append("")
        lines.append(rollout_line(result))

    counts = result.summary()
    what = ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items()))
    prefix = "dry run, nothing changed; " if result.dry_run else ""
    lines.append("")
    lines.append(f"{prefix}{len(result.hosts)} host(s): {what}; exit {result.exit_code}")
    return "\n".join(lines)


def as_json(result: RunResult) -> str:
    """The documented JSON document (``schema_version`` 1)."""
    from .engine import SCHEMA_VERSION

    document = {
        "schema_version": SCHEMA_VERSION,
        "mode": result.mode,
        "dry_run": result.dry_run,
        "exit_code": result.exit_code,
        "summary": result.summary(),
        "hosts": [
            {
                "host": host.host,
                "verdict": host.verdict,
                "status": host.status,
                "detail": host.detail,
                "changes": host.changes,
                "unmerge": host.unmerge,
                "audit": host.audit,
            }
            for host in result.hosts
        ],
    }
    return json.dumps(document, indent=2, sort_keys=False)
