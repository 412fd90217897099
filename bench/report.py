"""Turn measurements into the printed table, docs/benchmarks.md's results section and the plot."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .measure import Sample
from .tools import CONTENDERS, FLOOR
from .unmerge import NOTHING_MERGED, UnmergeResult

BEGIN = "<!-- bench:results:begin (written by python -m bench.run; do not edit) -->"
END = "<!-- bench:results:end -->"
LABELS = {c.key: c.label for c in CONTENDERS}
TARGET_HOSTS = 50
HELP_LIMIT_S = 0.15
X, DASH = "\u00d7", "\u2013"  # the multiplication sign and the en dash


@dataclass
class Summary:
    plan: dict[str, Any]
    quick: bool
    machine: dict[str, str]
    cells: list[dict[str, Any]]
    breakdowns: dict[int, list[dict[str, Any]]]
    imports: list[tuple[str, float]]
    helps: dict[str, float]
    help_max: dict[str, float]
    unmerge: dict[str, Any] | None
    elapsed_s: float


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def machine_info() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kib = int(handle.readline().split()[1])
    packages = ("pyinfra", "paramiko", "ansible-core", "gevent", "typer")
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} ?")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": f"{os.cpu_count()} {X} {cpu}",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssh": _version(["ssh", "-V"]),
        "packages": ", ".join(versions),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def summarize(rows: list[tuple[int, int, str, Sample]]) -> list[dict[str, Any]]:
    """One dict per (delay, N, tool): medians, spread, errors, ratio to the OpenSSH floor."""
    cells: dict[tuple[int, int, str], list[Sample]] = {}
    out: list[dict[str, Any]] = []
    for delay, hosts, tool, sample in rows:
        cells.setdefault((delay, hosts, tool), []).append(sample)
    for (delay, hosts, tool), samples in cells.items():
        good = [s for s in samples if not s.error] or samples
        walls = [s.wall_s for s in good]
        out.append(
            {
                "delay_ms": delay,
                "hosts": hosts,
                "tool": tool,
                "runs": len(good),
                "wall": statistics.median(walls),
                "wall_min": min(walls),
                "wall_max": max(walls),
                "cpu": statistics.median(s.cpu_s for s in good),
                "rss": statistics.median(s.tree_rss_mib for s in good),
                "errors": sorted({s.error for s in samples if s.error}),
                "samples": [asdict(s) for s in samples],
            }
        )
    for cell in out:
        floor = _cell(out, cell["delay_ms"], cell["hosts"], FLOOR)
        cell["ratio"] = cell["wall"] / floor["wall"] if floor else None
    order = {c.key: i for i, c in enumerate(CONTENDERS)}
    return sorted(out, key=lambda c: (c["delay_ms"], c["hosts"], order[c["tool"]]))


def _cell(cells: list[dict[str, Any]], delay: int, hosts: int, tool: str) -> dict[str, Any] | None:
    for cell in cells:
        if (cell["delay_ms"], cell["hosts"], cell["tool"]) == (delay, hosts, tool):
            return cell
    return None


def unmerge_summary(result: UnmergeResult) -> dict[str, Any]:
    bare, ours = result.median("echo 2"), result.median("ksm-guard unmerge")
    fixed = result.median(NOTHING_MERGED)
    return {
        "mib": result.mib,
        "runs": [asdict(r) for r in result.runs],
        "bare": bare,
        "ksm_guard": ours,
        "fixed_cost": fixed,
        "audit": result.audit_s,
        "lock_wait": result.lock_wait_s,
        "limit": 1.05 * bare + fixed,
    }


def _delay_label(delay: int) -> str:
    return f"{2 * delay} ms round trip (user-space relay)" if delay else "loopback, no added delay"


def results_tables(summary: Summary) -> list[str]:
    lines = []
    for delay in sorted({c["delay_ms"] for c in summary.cells}):
        lines += [
            f"#### {_delay_label(delay)}",
            "",
            f"| N | contender | runs | wall median (s) | min{DASH}max (s) | {X} OpenSSH | CPU (s) "
            "| peak RSS (MiB) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for cell in (c for c in summary.cells if c["delay_ms"] == delay):
            ratio = f"{cell['ratio']:.2f}" if cell["ratio"] else DASH
            error = " ⚠ " + "; ".join(cell["errors"]) if cell["errors"] else ""
            lines.append(
                f"| {cell['hosts']} | {LABELS[cell['tool']]}{error} | {cell['runs']} "
                f"| {cell['wall']:.2f} | {cell['wall_min']:.2f}{DASH}{cell['wall_max']:.2f} "
                f"| {ratio} | {cell['cpu']:.2f} | {cell['rss']:.0f} |"
            )
        lines.append("")
    return lines


def _target_hosts(summary: Summary) -> int:
    sizes = sorted({c["hosts"] for c in summary.cells})
    return TARGET_HOSTS if TARGET_HOSTS in sizes else max(sizes)


def targets(summary: Summary) -> list[tuple[str, str, bool]]:
    """(target, measured figure, met) for every target of issue #4."""
    hosts = _target_hosts(summary)
    rows = []
    for delay in sorted({c["delay_ms"] for c in summary.cells}):
        where = f"N={hosts}, {'loopback' if not delay else f'{2 * delay} ms RTT'}"
        ours = _cell(summary.cells, delay, hosts, "ksm-guard")
        floor = _cell(summary.cells, delay, hosts, FLOOR)
        bare = _cell(summary.cells, delay, hosts, "pyinfra")
        slow = _cell(summary.cells, delay, hosts, "ansible")
        if not (ours and floor and bare and slow):
            continue
        vs_floor = ours["wall"] / floor["wall"]
        vs_bare = ours["wall"] / bare["wall"]
        vs_ansible = slow["wall"] / ours["wall"]
        same_kex = _cell(summary.cells, delay, hosts, "openssh-c25519")
        if same_kex:
            vs_same = ours["wall"] / same_kex["wall"]
            rows.append(
                (
                    f"informative: ksm-guard ≤ 1.0{X} OpenSSH with curve25519 ({where})",
                    f"{ours['wall']:.2f} s vs {same_kex['wall']:.2f} s = {vs_same:.2f}{X}",
                    vs_same <= 1.0,
                )
            )
        rows += [
            (f"ksm-guard ≤ 1.0{X} OpenSSH ({where})",
             f"{ours['wall']:.2f} s vs {floor['wall']:.2f} s = {vs_floor:.2f}{X}", vs_floor <= 1.0),
            (f"ksm-guard ≤ 1.1{X} bare pyinfra fact ({where})",
             f"{ours['wall']:.2f} s vs {bare['wall']:.2f} s = {vs_bare:.2f}{X}", vs_bare <= 1.1),
            (f"ksm-guard ≥ 8{X} faster than Ansible ({where})",
             f"{slow['wall']:.2f} s / {ours['wall']:.2f} s = {vs_ansible:.1f}{X}", vs_ansible >= 8),
        ]  # fmt: skip
    for label, seconds in summary.helps.items():
        rows.append(
            (f"`{label}` ≤ {HELP_LIMIT_S} s", f"{seconds:.3f} s median", seconds <= HELP_LIMIT_S)
        )
    if summary.unmerge:
        u = summary.unmerge
        rows.append(
            (
                f"unmerge ≤ 1.05 {X} bare + fixed cost",
                f"{u['ksm_guard']:.2f} s vs {u['bare']:.2f} s {X} 1.05 + {u['fixed_cost']:.2f} s"
                f" = {u['limit']:.2f} s",
                u["ksm_guard"] <= u["limit"],
            )
        )
    return rows


def _breakdown_lines(summary: Summary) -> list[str]:
    hosts = summary.plan["breakdown_size"]
    lines = [
        f"Medians of {summary.plan['breakdown_runs']} replays at N={hosts} "
        "(`python -m bench.breakdown`), seconds:",
        "",
    ]
    header = "| stage |"
    rule = "| --- |"
    columns = []
    for delay, items in sorted(summary.breakdowns.items()):
        for item in items:
            what = "ksm-guard (KsmHost)" if item["fact"] == "ksm" else "pyinfra server.Command"
            header += f" {what}, {'loopback' if not delay else f'{2 * delay} ms'} |"
            rule += " ---: |"
            columns.append(item)
    lines += [header, rule]
    for stage in columns[0]["stages"] if columns else []:
        lines.append(
            f"| {stage} | " + " | ".join(f"{c['stages'][stage]:.3f}" for c in columns) + " |"
        )
    if columns:
        lines.append(
            "| **total** | "
            + " | ".join(f"**{sum(c['stages'].values()):.3f}**" for c in columns)
            + " |"
        )
        cli = []
        for delay, items in sorted(summary.breakdowns.items()):
            for item in items:
                tool = "ksm-guard" if item["fact"] == "ksm" else "pyinfra"
                cell = _cell(summary.cells, delay, hosts, tool)
                cli.append(f"{cell['wall']:.3f}" if cell else DASH)
        lines.append("| the CLI itself, matrix median | " + " | ".join(cli) + " |")
    lines += [
        "",
        "Import time on the audit path by top-level package (`-X importtime`, self times): "
        + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in summary.imports)
        + ".",
        "",
    ]
    return lines


def markdown(summary: Summary) -> str:
    m = summary.machine
    plan = summary.plan
    capped = ", ".join(f"{k}: {v} runs" for k, v in plan["capped"].items()) or "none"
    wait = summary.unmerge["lock_wait"] if summary.unmerge else 0.0
    waited = f" (of which {wait / 60:.1f} min waiting for the local-KSM lock)" if wait > 1 else ""
    lines = [
        BEGIN,
        "",
        "### This run",
        "",
        f"- {'**Quick run** (`--quick`), not the reference figures. ' if summary.quick else ''}"
        f"{m['date']}; the whole benchmark took **{summary.elapsed_s / 60:.1f} min**{waited}.",
        f"- Machine: {m['cpu']}, {m['memory']}, Linux {m['kernel']}, Python {m['python']}, "
        f"{m['openssh']}; load average at start {m['load']}.",
        f"- Packages: {m['packages']}.",
        f"- N = {', '.join(map(str, plan['sizes']))}; {plan['repetitions']} runs per cell "
        f"(capped cells: {capped}), after one unrecorded warm-up run per contender and fleet.",
        "",
        "### Results",
        "",
        *results_tables(summary),
        "![wall time against N, per contender](benchmarks.png)",
        "",
        "### Where ksm-guard's time goes",
        "",
        *_breakdown_lines(summary),
        "### `--help`",
        "",
        *(
            f"- `{label}`: {seconds:.3f} s median, {summary.help_max[label]:.3f} s max "
            f"({plan['help_runs']} runs)"
            for label, seconds in summary.helps.items()
        ),
        "",
    ]
    if summary.unmerge:
        u = summary.unmerge
        lines += [
            "### Unmerge overhead",
            "",
            f"{u['mib']} MiB of identical private pages, merged by the local ksmd before each run:",
            "",
            "| run | unmerge | seconds | workload pages merged before | global pages_sharing "
            "| left after |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for i, r in enumerate(u["runs"], start=1):
            lines.append(
                f"| {i} | `{r['tool']}` | {r['seconds']:.3f} | {r['merged_pages']} "
                f"| {r['pages_sharing']} | {r['left_pages']} |"
            )
        lines += [
            "",
            f"Medians: bare `echo 2 > run` **{u['bare']:.3f} s**; `ksm-guard unmerge -y -i @local`"
            f" **{u['ksm_guard']:.3f} s**; the same with nothing merged (ksm-guard's fixed cost: "
            f"start, imports, reads, disable steps, checks) {u['fixed_cost']:.3f} s; "
            f"`ksm-guard audit -i @local` {u['audit']:.3f} s. The unmerge itself thus costs "
            f"ksm-guard {u['ksm_guard'] - u['fixed_cost']:.3f} s against {u['bare']:.3f} s bare.",
            "",
        ]
    lines += ["### Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for target, figure, met in targets(summary):
        lines.append(f"| {target} | {figure} | {'yes' if met else '**no**'} |")
    lines += ["", END]
    return "\n".join(lines)


def text_table(summary: Summary) -> str:
    """The table printed on stdout."""
    out = [
        f"{'delay':>9} {'N':>4} {'contender':<28} {'runs':>4} {'wall':>7} {'min':>7} "
        f"{'max':>7} {'xSSH':>6} {'CPU':>7} {'RSS MiB':>8}"
    ]
    for c in summary.cells:
        delay = f"{2 * c['delay_ms']}ms RTT" if c["delay_ms"] else "loopback"
        ratio = f"{c['ratio']:.2f}" if c["ratio"] else "-"
        out.append(
            f"{delay:>9} {c['hosts']:>4} {LABELS[c['tool']]:<28} {c['runs']:>4} "
            f"{c['wall']:>7.2f} {c['wall_min']:>7.2f} {c['wall_max']:>7.2f} {ratio:>6} "
            f"{c['cpu']:>7.2f} {c['rss']:>8.0f}{'  ERRORS' if c['errors'] else ''}"
        )
    for label, seconds in summary.helps.items():
        out.append(f"{label}: {seconds:.3f} s median")
    if summary.unmerge:
        u = summary.unmerge
        out.append(
            f"unmerge {u['mib']} MiB: echo 2 {u['bare']:.3f} s, ksm-guard unmerge "
            f"{u['ksm_guard']:.3f} s (fixed cost {u['fixed_cost']:.3f} s)"
        )
    for target, figure, met in targets(summary):
        out.append(f"target {'MET   ' if met else 'MISSED'} {target}: {figure}")
    wait = summary.unmerge["lock_wait"] if summary.unmerge else 0.0
    out.append(
        f"benchmark wall time: {summary.elapsed_s:.0f} s ({wait:.0f} s waiting for the lock)"
    )
    return "\n".join(out)


def plot(summary: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    delays = sorted({c["delay_ms"] for c in summary.cells})
    figure, axes = plt.subplots(1, len(delays), figsize=(6 * len(delays), 4.5), sharey=True)
    for axis, delay in zip(figure.axes if len(delays) > 1 else [axes], delays, strict=True):
        for contender in CONTENDERS:
            cells = [
                c for c in summary.cells if c["delay_ms"] == delay and c["tool"] == contender.key
            ]
            if not cells:
                continue
            xs = [c["hosts"] for c in cells]
            ys = [c["wall"] for c in cells]
            spread = [
                [c["wall"] - c["wall_min"] for c in cells],
                [c["wall_max"] - c["wall"] for c in cells],
            ]
            axis.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=contender.label)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(summary.plan["sizes"], [str(n) for n in summary.plan["sizes"]])
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axis.set_title(_delay_label(delay))
        axis.set_xlabel("hosts (N)")
        axis.grid(True, which="both", alpha=0.3)
    figure.axes[0].set_ylabel(f"wall time, median (s); bars: min{DASH}max")
    figure.axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


STUB = """# Benchmarks

(Run `make bench` to fill in the results.)

"""


def write(summary: Summary, docs: Path) -> None:
    """Replace the results section of benchmarks.md; write the plot and the raw figures."""
    docs.mkdir(parents=True, exist_ok=True)
    doc = docs / "benchmarks.md"
    text = doc.read_text(encoding="utf-8") if doc.exists() else STUB + f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: markdown(summary), text), encoding="utf-8")
    (docs / "benchmarks.json").write_text(
        json.dumps(asdict(summary), indent=1, default=str) + "\n", encoding="utf-8"
    )
    plot(summary, docs / "benchmarks.png")
