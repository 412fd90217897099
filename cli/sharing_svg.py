"""The sharing map in the evidence report: a VM pair matrix as inline SVG, and its tables."""

from __future__ import annotations

from html import escape
from typing import Any

from ksm_guard.operations.report import AuditRecord, human_bytes

from .sharing_render import vm_name

CELL, LABEL = 34, 150
SHARED_RGB = (198, 40, 40)  # the report's "ksm-running" red: memory shared across VMs
WITHIN_RGB = (96, 125, 139)  # grey-blue: merged only within the VM, no channel


def _fill(rgb: tuple[int, int, int], share: float) -> str:
    """
    ``rgb`` over white by ``share`` of the largest value: white for nothing, at least a clear
    tint for any sharing, full colour for the largest; square-root scale, so that a pair with a
    hundredth of the top still shows.
    """
    strength = 0.0 if share <= 0 else 0.18 + 0.82 * min(share, 1.0) ** 0.5
    red, green, blue = (round(255 - (255 - part) * strength) for part in rgb)
    return f"rgb({red},{green},{blue})"


def pair_matrix(audit: AuditRecord) -> str:
    """
    Every mapped VM against every other: a cell's red is the bytes of KSM pages the two share
    (darkest: the most shared pair); the diagonal's grey is what the VM merged only within itself.
    """
    vms = [vm for vm in audit["vms"] if vm.get("shared_with") is not None]
    if len(vms) < 2:
        return ""
    index = {vm["pid"]: number for number, vm in enumerate(vms)}
    shared: dict[tuple[int, int], int] = {}
    for pair in audit.get("sharing", {}).get("pairs", []):
        first, second = index.get(pair["a"]["pid"]), index.get(pair["b"]["pid"])
        if first is not None and second is not None:
            shared[(first, second)] = shared[(second, first)] = pair["bytes"]
    top = max(shared.values(), default=0) or 1
    within_top = max((vm.get("merged_within_bytes") or 0 for vm in vms), default=0) or 1
    parts: list[str] = []
    for row, vm in enumerate(vms):
        name = vm_name(dict(vm))
        short = name if len(name) <= 22 else f"{name[:21]}…"
        y = LABEL + row * CELL
        parts.append(
            f'<text x="{LABEL - 6}" y="{y + CELL / 2 + 4}" text-anchor="end">'
            f"<title>{escape(name)}</title>{escape(short)}</text>"
            f'<text transform="translate({LABEL + row * CELL + CELL / 2 + 4},{LABEL - 6}) '
            f'rotate(-60)"><title>{escape(name)}</title>{escape(short)}</text>'
        )
        for column, other in enumerate(vms):
            x = LABEL + column * CELL
            if row == column:
                value = vm.get("merged_within_bytes") or 0
                fill, what = _fill(WITHIN_RGB, value / within_top), "merged within itself"
                title = f"{name}: {human_bytes(value)} {what}"
            else:
                value = shared.get((row, column), 0)
                fill = _fill(SHARED_RGB, value / top)
                title = f"{name} and {vm_name(dict(other))} share {human_bytes(value)}"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{CELL - 2}" height="{CELL - 2}" fill="{fill}" '
                f'stroke="#dde3ea"><title>{escape(title)}</title></rect>'
            )
    size = LABEL + len(vms) * CELL + 4
    width = size + LABEL  # room for the last column's slanted label
    return (
        f'<svg class="sharing" viewBox="0 0 {width} {size}" style="max-width:{width * 1.5:.0f}px" '
        f'role="img" aria-label="KSM pages shared between VMs">{"".join(parts)}</svg>'
        '<div class="legend">'
        f'<span><i class="swatch" style="background:{_fill(SHARED_RGB, 1)}"></i>shared between '
        f"two VMs (darkest: {human_bytes(max(shared.values(), default=0))})</span>"
        f'<span><i class="swatch" style="background:{_fill(WITHIN_RGB, 1)}"></i>merged only '
        "within the VM (the diagonal)</span></div>"
    )


def section(audit: AuditRecord, table: Any) -> str:
    """The report's sharing part for one host: the matrix, the pairs, the tenant pairs."""
    sharing = audit.get("sharing")
    if sharing is None:
        return ""
    if sharing["error"]:
        return f"<h3>Sharing map</h3><p>Not made: {escape(sharing['error'])}</p>"
    rows = [
        [escape(vm_name(p["a"])), escape(vm_name(p["b"])), escape(human_bytes(p["bytes"]))]
        for p in sharing["pairs"]
    ]
    pairs = (
        table(["VM", "shares with VM", "bytes"], rows, {2: "num"})
        if rows
        else ("<p>No two VMs share a KSM page.</p>")
    )
    tenants = "".join(
        f"<li>tenant {escape(t['a'])} shares {escape(human_bytes(t['bytes']))} "
        f"{'within itself' if t['a'] == t['b'] else 'with tenant ' + escape(t['b'])}</li>"
        for t in sharing["tenant_pairs"]
    )
    return (
        "<h3>Sharing map</h3><p>Distinct physical KSM pages two VMs both map "
        f"(scanned {escape(human_bytes(sharing['scanned_bytes']))} of the VMs' address space in "
        f"{sharing['cpu_seconds']} s of CPU).</p>"
        f"{pair_matrix(audit)}{pairs}{f'<ul>{tenants}</ul>' if tenants else ''}"
    )
