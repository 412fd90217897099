"""The sharing map of ``audit --vms --sharing`` as text: VM pairs, VMs, tenant pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ksm_guard.operations.report import human_bytes

if TYPE_CHECKING:
    from .engine import RunResult


def vm_name(vm: dict[str, Any]) -> str:
    """``100 (web1)``, ``web1`` or ``pid 4242``: how a VM reads in the map."""
    label = vm.get("vmid") or (None if vm.get("name") else f"pid {vm['pid']}")
    if label and vm.get("name"):
        return f"{label} ({vm['name']})"
    return str(label or vm["name"])


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def sharing_table(result: RunResult) -> list[str]:
    """
    The VM pairs of every mapped host by shared bytes (most first); each VM's pages merged only
    within itself and shared with processes other than VMs; then one line per tenant pair.
    """
    mapped = [(host.host, host.audit) for host in result.hosts if host.audit]
    mapped = [(name, audit) for name, audit in mapped if "sharing" in audit]
    if not mapped:
        return []
    pairs = [(name, pair) for name, audit in mapped for pair in audit["sharing"]["pairs"]]
    pairs.sort(key=lambda item: -item[1]["bytes"])
    header = ["HOST", "VM", "SHARES WITH VM", "SHARED"]
    rows = [[name, vm_name(p["a"]), vm_name(p["b"]), human_bytes(p["bytes"])] for name, p in pairs]
    lines = ["sharing map (distinct physical KSM pages both VMs map):"]
    lines += _columns([header, *rows]) if rows else ["no two VMs share a KSM page"]
    vm_rows = [
        [
            name,
            vm_name(dict(vm)),
            human_bytes(vm["merged_within_bytes"] or 0),
            human_bytes(vm["shared_with_other_bytes"] or 0),
            vm.get("tenant") or "-",
        ]
        for name, audit in mapped
        for vm in audit["vms"]
        if vm.get("merged_within_bytes") is not None
    ]
    if vm_rows:
        header = ["HOST", "VM", "MERGED WITHIN", "SHARED WITH NON-VM", "TENANT"]
        lines += ["", *_columns([header, *vm_rows])]
    for name, audit in mapped:
        for pair in audit["sharing"]["tenant_pairs"]:
            what = "within" if pair["a"] == pair["b"] else "with"
            other = "itself" if pair["a"] == pair["b"] else f"tenant {pair['b']}"
            lines.append(
                f"{name}: tenant {pair['a']} shares {human_bytes(pair['bytes'])} {what} {other} "
                f"({pair['vm_pairs']} VM pair(s))"
            )
        lines += [
            f"{name}: VM {vm_name(dict(vm))} not mapped: {vm['sharing_error']}"
            for vm in audit["vms"]
            if vm.get("sharing_error") and not audit["sharing"]["error"]
        ]
    return lines
