"""
The evidence report as one HTML page: inline CSS and SVG, no scripts, nothing fetched.

Every text that comes from a host or the inventory goes through ``html.escape``.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

from ksm_guard.operations.model import PERSIST_PATH, Verdict
from ksm_guard.operations.report import AuditRecord, human_bytes, record_unit_state

from .capacity_render import (
    command_line,
    grid,
    move_line,
    notes,
    outcome_lines,
    outlook,
    search_words,
)
from .evidence import CONTROLS, JSON_FILE, JUNIT_FILE, SUMS_FILE
from .sharing_svg import section as sharing_section

if TYPE_CHECKING:
    from ksm_guard.operations.model import Evidence, Vm

    from .evidence import HostReport, Report

COLORS = {
    Verdict.COMPLIANT: "#2e7d32",
    Verdict.UNSUPPORTED: "#607d8b",
    Verdict.MERGED_PAGES_REMAIN: "#ef6c00",
    Verdict.SERVICE_ENABLED: "#b8860b",
    Verdict.KSM_RUNNING: "#c62828",
    Verdict.UNREACHABLE: "#6a1b9a",
    Verdict.ERROR: "#37474f",
}
MERGED_COLOR = "#3949ab"
NEED_COLOR = "#ef6c00"
EXIT_MEANING = {
    0: "every host compliant or unsupported",
    1: "a host is exposed",
    3: "a host was unreachable or unreadable",
}

CSS = """
:root { color-scheme: light; --ink: #1c2430; --muted: #5b6675; --rule: #d7dde5; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 24px 32px 48px; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 28px 0 10px; padding-bottom: 4px;
  border-bottom: 2px solid var(--rule); display: flex; gap: 12px; align-items: center;
  flex-wrap: wrap; overflow-wrap: anywhere; }
h3 { font-size: 14px; margin: 16px 0 6px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
p { margin: 6px 0; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
  overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--rule);
  vertical-align: top; overflow-wrap: break-word; }
td.id, td.result { white-space: nowrap; }
th { font-weight: 600; color: var(--muted); font-size: 12.5px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 220px; }
.lede { color: var(--muted); margin-bottom: 14px; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0; }
.meta dt { color: var(--muted); }
.meta dd { margin: 0; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 11px; color: #fff;
  font-size: 13px; font-weight: 600; white-space: nowrap; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0 14px; }
.tile { border: 1px solid var(--rule); border-left: 6px solid; border-radius: 6px;
  padding: 6px 14px; min-width: 140px; }
.tile b { display: block; font-size: 24px; }
.result span { font-weight: 700; text-transform: uppercase; font-size: 12px; }
.sysfs { columns: 3 220px; column-gap: 24px; margin: 4px 0 8px; }
.sysfs div { display: flex; justify-content: space-between; gap: 8px; padding: 2px 0;
  border-bottom: 1px solid var(--rule); break-inside: avoid; }
.pass { color: #2e7d32; } .fail { color: #c62828; } .skip { color: #607d8b; }
.error { color: #6a1b9a; }
.exit { font-size: 16px; margin: 8px 0; }
svg { display: block; width: 100%; height: auto; margin: 6px 0 10px; }
svg text { font: 12px system-ui, "DejaVu Sans", sans-serif; fill: var(--ink); }
.legend { display: flex; gap: 16px; color: var(--muted); font-size: 12.5px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px; }
details pre { background: #f5f7fa; border: 1px solid var(--rule); padding: 8px; font-size: 11.5px;
  white-space: pre-wrap; overflow-wrap: anywhere; }
.host { break-inside: auto; }
footer { margin-top: 32px; color: var(--muted); font-size: 12.5px; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  * { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  .host { break-before: page; }
  h2, h3 { break-after: avoid; }
  tr, .tile, svg { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
  details pre { font-size: 8pt; }
}
"""


def _badge(verdict: str) -> str:
    color = COLORS.get(Verdict(verdict), "#37474f")
    return f'<span class="badge" style="background:{color}">{escape(verdict)}</span>'


def _table(header: list[str], rows: list[list[str]], classes: dict[int, str] | None = None) -> str:
    """A table of cells that are already HTML; ``classes``: a CSS class per column number."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    classes = classes or {}
    cells = [f'<td class="{classes[i]}">' if i in classes else "<td>" for i in range(len(header))]
    body = "".join(
        "<tr>" + "".join(f"{cells[i]}{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: list[tuple[str, str]]) -> str:
    """Label / value rows; values are already HTML."""
    rows = "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _text(value: object) -> str:
    return "&ndash;" if value is None else escape(str(value))


def _code(value: object) -> str:
    return "&ndash;" if value is None else f"<code>{escape(str(value))}</code>"


def merged_bytes(audit: AuditRecord) -> int:
    """Memory in merged pages: ``(pages_shared + pages_sharing + ksm_zero_pages) x page size``."""
    pages = audit["pages_shared"] + audit["pages_sharing"] + audit["ksm_zero_pages"]
    return pages * audit["page_size"]


def verdict_bar(counts: Mapping[str, int]) -> str:
    """The fleet's verdicts as one stacked bar, most severe last."""
    total = sum(counts.values()) or 1
    width, x, parts = 600.0, 0.0, []
    for verdict in Verdict:
        count = counts.get(verdict.value, 0)
        if not count:
            continue
        part = width * count / total
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{part:.1f}" height="26" fill="{COLORS[verdict]}">'
            f"<title>{escape(verdict.value)}: {count}</title></rect>"
        )
        if part >= 28:
            parts.append(
                f'<text x="{x + part / 2:.1f}" y="17.5" text-anchor="middle" '
                f'style="fill:#fff;font-weight:700">{count}</text>'
            )
        x += part
    label = ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
    return (
        f'<svg viewBox="0 0 {width:.0f} 26" role="img" aria-label="verdicts: {escape(label)}">'
        + "".join(parts)
        + "</svg>"
    )


def memory_chart(hosts: list[HostReport]) -> str:
    """Per host: memory merged and what an unmerge must find, on one scale, with its limit."""
    label_width, bar_width, row = 190, 330, 38
    audits = [host.result.audit for host in hosts]
    scale = max((merged_bytes(a) for a in audits if a is not None), default=0)
    parts = []
    for number, (host, audit) in enumerate(zip(hosts, audits, strict=True)):
        top = number * row + 4
        name = host.result.host
        short = name if len(name) <= 26 else f"{name[:25]}…"
        parts.append(
            f'<text x="{label_width - 8}" y="{top + 17}" text-anchor="end">'
            f"<title>{escape(name)}</title>{escape(short)}</text>"
        )
        if audit is None:
            parts.append(
                f'<text x="{label_width}" y="{top + 17}" style="fill:#6a1b9a">'
                f"not read: {escape(host.result.verdict)}</text>"
            )
            continue
        merged, need = merged_bytes(audit), audit["unmerge_need_bytes"]
        limit = int(audit["mem_available_bytes"] * audit["unmerge_max_fraction"])
        for offset, value, color, what in (
            (2, merged, MERGED_COLOR, "merged"),
            (16, need, NEED_COLOR, "unmerge need"),
        ):
            length = bar_width * value / scale if scale else 0.0
            if value and length < 1:
                length = 1.0
            parts.append(
                f'<rect x="{label_width}" y="{top + offset}" width="{bar_width}" height="12" '
                'fill="#eef1f5"/>'
                f'<rect x="{label_width}" y="{top + offset}" width="{length:.1f}" height="12" '
                f'fill="{color}"><title>{what}: {human_bytes(value)}</title></rect>'
            )
        if scale and limit <= scale:
            at = label_width + bar_width * limit / scale
            parts.append(
                f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{top}" y2="{top + 32}" '
                f'stroke="#c62828" stroke-width="2" stroke-dasharray="3 2">'
                f"<title>unmerge limit: {human_bytes(limit)}</title></line>"
            )
        safe = "" if audit["unmerge_safe"] else " — over the limit"
        parts.append(
            f'<text x="{label_width + bar_width + 12}" y="{top + 12}">'
            f"merged {human_bytes(merged)}</text>"
            f'<text x="{label_width + bar_width + 12}" y="{top + 27}">'
            f"need {human_bytes(need)} of {human_bytes(limit)} allowed{safe}</text>"
        )
    height = max(len(hosts) * row + 8, 20)
    full = f"a full bar is {human_bytes(scale)}" if scale else "no host has merged memory"
    return (
        f'<svg viewBox="0 0 900 {height}" role="img" '
        f'aria-label="memory merged and unmerge need per host">{"".join(parts)}</svg>'
        '<div class="legend">'
        f'<span><i class="swatch" style="background:{MERGED_COLOR}"></i>memory merged</span>'
        f'<span><i class="swatch" style="background:{NEED_COLOR}"></i>unmerge need</span>'
        '<span><i class="swatch" style="background:#c62828"></i>unmerge limit '
        "(max fraction &times; MemAvailable), where it falls on the scale</span>"
        f"<span>{full}</span></div>"
    )


def _header(report: Report) -> str:
    meta, result = report.meta, report.result
    code = result.exit_code
    digest = _code(meta.inventory_sha256) if meta.inventory_sha256 else "&ndash; (not a file)"
    pairs = [
        ("audit started (controller, UTC)", _text(meta.started_at)),
        ("ksm-guard", _text(meta.version)),
        ("command line", _code(meta.command_line)),
        ("controller", f"{_text(meta.user)} on {_text(meta.controller)}"),
        ("inventory", _code(meta.inventory)),
        ("inventory SHA-256", digest),
    ]
    items = "".join(f"<dt>{escape(label)}</dt><dd>{value}</dd>" for label, value in pairs)
    return (
        "<header><h1>KSM evidence report</h1>"
        '<p class="lede">Kernel Samepage Merging audited by ksm-guard: read-only, one command per '
        "host, nothing changed.</p>"
        f'<p class="exit">{len(result.hosts)} host(s) — exit code <b>{code}</b>: '
        f"{escape(EXIT_MEANING.get(code, ''))}</p>"
        f'<dl class="meta">{items}</dl></header>'
    )


def _summary(report: Report) -> str:
    counts = report.result.summary()
    ordered: dict[str, int] = {v.value: counts[v.value] for v in Verdict if v.value in counts}
    tiles = "".join(
        f'<div class="tile" style="border-left-color:{COLORS[Verdict(verdict)]}">'
        f"<b>{count}</b>{escape(verdict)}</div>"
        for verdict, count in ordered.items()
    )
    rows = []
    for number, host in enumerate(report.hosts, 1):
        audit = host.result.audit
        failed = [c.id for c, o in host.controls if o.result in ("fail", "error")]
        rows.append(
            [
                f'<a href="#host-{number}">{escape(host.result.host)}</a>',
                _badge(host.result.verdict),
                "&ndash;" if audit is None else _text(audit["run"]),
                "&ndash;" if audit is None else human_bytes(merged_bytes(audit)),
                "&ndash;" if audit is None else human_bytes(audit["unmerge_need_bytes"]),
                "&ndash;" if audit is None else escape(audit["boot_persistence"]),
                escape(", ".join(failed)) or '<span class="pass">none</span>',
            ]
        )
    table = _table(
        [
            "host",
            "verdict",
            "run",
            "merged",
            "unmerge need",
            "boot persistence",
            "controls not passed",
        ],
        rows,
        {2: "num", 3: "num", 4: "num"},
    )
    return (
        '<section id="summary"><h2>Fleet summary</h2>'
        f'<div class="tiles">{tiles}</div>{verdict_bar(ordered)}'
        f"<h3>Memory merged and unmerge need</h3>{memory_chart(report.hosts)}"
        f"<h3>Hosts</h3>{table}</section>"
    )


def _controls(host: HostReport) -> str:
    rows = [
        [
            f"<code>{escape(control.id)}</code>",
            escape(control.title),
            f'<span class="{outcome.result}">{outcome.result}</span>',
            escape(outcome.message),
        ]
        for control, outcome in host.controls
    ]
    return _table(["control", "check", "result", "found"], rows, {0: "id", 2: "result"})


def _figures(audit: AuditRecord) -> str:
    need = (
        f"{human_bytes(audit['unmerge_need_bytes'])} of {human_bytes(audit['mem_available_bytes'])}"
    )
    limit = f"{audit['unmerge_max_fraction']:g} &times; MemAvailable"
    return _kv(
        [
            ("run", _code(audit["run"])),
            ("pages_shared", _text(audit["pages_shared"])),
            ("pages_sharing", _text(audit["pages_sharing"])),
            ("ksm_zero_pages", _text(audit["ksm_zero_pages"])),
            ("memory merged", escape(human_bytes(merged_bytes(audit)))),
            ("unmerge need / MemAvailable", escape(need)),
            ("unmerge safe", f"{'yes' if audit['unmerge_safe'] else 'no'} (limit {limit})"),
            ("page size", _text(audit["page_size"])),
            ("uid of the read", _text(audit["uid"])),
            ("qemu-server", _text(audit["qemu_server"] or "not installed")),
        ]
    )


def _units(audit: AuditRecord) -> str:
    if not audit["systemd"]:
        return "<p>No systemd on this host: no KSM units.</p>"
    rows = [
        [f"<code>{escape(name)}</code>", escape(record_unit_state(unit))]
        for name, unit in audit["units"].items()
    ]
    return _table(["unit", "unit file / active"], rows)


def _flag(value: bool | None) -> str:
    return "&ndash;" if value is None else ("yes" if value else "no")


def _vms(vms: list[Vm]) -> str:
    if not vms:
        return "<p>No running QEMU VMs.</p>"
    rows = [
        [
            _text(vm["vmid"]),
            _text(vm["name"]),
            _text(vm["pid"]),
            "?" if vm["merged_bytes"] is None else escape(human_bytes(vm["merged_bytes"])),
            _flag(vm["mem_merge"]),
            _flag(vm["allow_ksm"]),
            _flag(vm["restart_pending"] if vm["allow_ksm"] is not None else None),
        ]
        for vm in vms
    ]
    header = ["VMID", "name", "pid", "merged", "mem-merge", "allow-ksm", "restart pending"]
    return _table(header, rows, {2: "num", 3: "num"})


def _sysfs(host: HostReport) -> str:
    ksm = host.state["ksm"] if host.state else None
    if not ksm:
        return "<p>The kernel has no <code>/sys/kernel/mm/ksm</code>.</p>"
    items = "".join(
        f"<div><code>{escape(name)}</code><b>{_code(value)}</b></div>"
        for name, value in sorted(ksm.items())
    )
    return f'<p>Every file of <code>/sys/kernel/mm/ksm</code>:</p><div class="sysfs">{items}</div>'


def _evidence(host: HostReport) -> str:
    evidence: Evidence | None = host.state.get("evidence") if host.state else None
    parts = []
    if evidence is None:
        parts.append("<p>No evidence section in this host's answer.</p>")
    else:
        parts.append(
            _kv(
                [
                    ("read at (host clock, UTC)", _text(evidence["time"])),
                    ("hostname", _code(evidence["hostname"])),
                    ("kernel release", _code(evidence["kernel"])),
                    ("machine-id", _code(evidence["machine_id"])),
                    ("boot id", _code(evidence["boot_id"])),
                ]
            )
        )
        keys = [
            [
                _text(key["type"]),
                _text(key["bits"]),
                _code(key["fingerprint"] or "unreadable"),
                _text(key["comment"]),
                _code(key["path"]),
            ]
            for key in evidence["host_keys"]
        ]
        if keys:
            parts.append(_table(["SSH host key", "bits", "fingerprint", "comment", "file"], keys))
        elif not evidence["ssh_keygen"]:
            parts.append("<p>No <code>ssh-keygen</code> on the host: no key fingerprints.</p>")
        else:
            parts.append("<p>No SSH host keys in <code>/etc/ssh</code>.</p>")
    if host.raw_path and host.output is not None:
        link = f'<a href="{escape(quote(host.raw_path))}">{escape(host.raw_path)}</a>'
        parts.append(
            f"<p>The fact command's output as received: {link}, SHA-256 "
            f"{_code(host.raw_sha256)}.</p>"
            f"<details><summary>show the raw output ({len(host.output)} lines)</summary>"
            f"<pre>{escape(chr(10).join(host.output))}</pre></details>"
        )
    else:
        parts.append("<p>No raw output: the fact command did not run on this host.</p>")
    return "".join(parts)


def _capacity(report: Report) -> str:
    """``ksm-guard plan`` on the same reads: per-host table, moves, notes, pools, N+1."""
    plan = report.capacity
    header, *rows = grid(plan)
    numeric = {index: "num" for index in range(1, 7)}
    parts = [
        '<section id="capacity"><h2>Capacity plan</h2>',
        "<p>What switching KSM off costs each host (the model of <code>ksm-guard plan</code>, "
        "keeping 10% of RAM available; nothing was run):</p>",
        _table(
            [escape(column.lower()) for column in header],
            [[escape(c) for c in r] for r in rows],
            numeric,
        ),
    ]
    if plan.moves:
        items = []
        for move in plan.moves:
            command = command_line(move)
            run = f"<br><code>{escape(command)}</code>" if command else ""
            items.append(f"<li>{escape(move_line(move))}{run}</li>")
        parts.append(
            f"<h3>Proposed moves ({escape(search_words(plan))})</h3><ul>{''.join(items)}</ul>"
        )
    lines = [*notes(plan), *outcome_lines(plan), outlook(plan)]
    parts.append("".join(f"<p>{escape(line.strip())}</p>" for line in lines))
    return "".join(parts) + "</section>"


def _host(number: int, host: HostReport) -> str:
    result, audit = host.result, host.result.audit
    head = (
        f'<section class="host" id="host-{number}">'
        f"<h2>{escape(result.host)} {_badge(result.verdict)}</h2>"
    )
    if audit is None:
        body = (
            f"<p>{escape(result.verdict)}: {_text(result.detail)}</p>"
            f"<h3>Controls</h3>{_controls(host)}<h3>Evidence</h3>{_evidence(host)}"
        )
        return f"{head}{body}</section>"
    persistence = {
        "present": f"present: <code>{PERSIST_PATH}</code> writes run=0 at every boot",
        "modified": f"modified: <code>{PERSIST_PATH}</code> exists without ksm-guard's line",
        "absent": f"absent: no <code>{PERSIST_PATH}</code>",
    }[audit["boot_persistence"]]
    return (
        f"{head}<h3>Controls</h3>{_controls(host)}"
        f"<h3>run and counters</h3>{_figures(audit)}"
        f"<h3>Units</h3>{_units(audit)}"
        f"<h3>Boot persistence</h3><p>{persistence}</p>"
        f"<h3>VMs</h3>{_vms(audit['vms'])}{sharing_section(audit, _table)}"
        f"<h3>KSM sysfs</h3>{_sysfs(host)}"
        f"<h3>Evidence</h3>{_evidence(host)}</section>"
    )


def page(report: Report) -> str:
    """The whole report page."""
    controls = "".join(f"<li><code>{escape(c.id)}</code> {escape(c.title)}</li>" for c in CONTROLS)
    title = f"KSM evidence report — {len(report.hosts)} host(s), {report.meta.started_at}"
    hosts = "".join(_host(number, host) for number, host in enumerate(report.hosts, 1))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"{_header(report)}{_summary(report)}{_capacity(report)}{hosts}"
        f"<footer><p>Controls:</p><ul>{controls}</ul>"
        f"<p>This page, <code>{JSON_FILE}</code>, <code>{JUNIT_FILE}</code> and every "
        f"<code>raw/</code> file are listed in <code>{SUMS_FILE}</code>: run "
        f"<code>sha256sum -c {SUMS_FILE}</code> in the report's directory to check that none "
        "was altered.</p></footer></body></html>\n"
    )
