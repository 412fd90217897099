"""Run the fleet benchmark: ``python -m bench.run [--quick]`` (``make bench`` runs the full one).

Starts a fleet of sshd hosts (loopback, then behind a 20 ms round trip), runs every contender
for each N with rotating order, then the audit breakdown, the ``--help`` timings and the unmerge
overhead; prints the table and writes ``docs/benchmarks.md`` (its results section),
``docs/benchmarks.png`` and ``docs/benchmarks.json``. Everything it starts is stopped again,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from . import report
from .breakdown import Breakdown, breakdown, import_profile
from .fleet import Fleet
from .measure import Sample, measure
from .tools import CONTENDERS, Cell, Contender
from .unmerge import KSM, UnmergeResult, measure_unmerge

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures."""

    sizes: tuple[int, ...]
    delays_ms: tuple[int, ...]  # one way; 0 is plain loopback
    repetitions: int
    capped: dict[tuple[str, int], int]  # (contender, N) -> fewer runs, for the slowest cells
    breakdown_size: int
    breakdown_runs: int
    help_runs: int
    unmerge_mib: int
    unmerge_repetitions: int


FULL = Plan(
    sizes=(1, 10, 50, 100),
    delays_ms=(0, 10),
    repetitions=5,
    capped={("ansible", 100): 3},
    breakdown_size=50,
    breakdown_runs=3,
    help_runs=21,
    unmerge_mib=288,
    unmerge_repetitions=3,
)
QUICK = Plan(
    sizes=(1, 10),
    delays_ms=(0, 10),
    repetitions=2,
    capped={},
    breakdown_size=10,
    breakdown_runs=1,
    help_runs=5,
    unmerge_mib=256,
    unmerge_repetitions=1,
)


@dataclass(frozen=True)
class Result:
    """One run of one contender in one cell."""

    delay_ms: int
    hosts: int
    tool: str
    sample: Sample


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _runs(plan: Plan, contender: Contender, hosts: int) -> int:
    return min(plan.repetitions, plan.capped.get((contender.key, hosts), plan.repetitions))


def run_matrix(plan: Plan, fleet: Fleet, workdir: Path) -> list[Result]:
    """Every contender, every N, ``repetitions`` times; the order rotates between rounds."""
    results = []
    for contender in CONTENDERS:  # warm the page cache and byte code; not recorded
        measure(contender.build(Cell(fleet, 1, workdir)), workdir, RUN_TIMEOUT_S)
    for hosts in plan.sizes:
        cell = Cell(fleet, hosts, workdir)
        for round_ in range(plan.repetitions):
            shift = round_ % len(CONTENDERS)
            for contender in CONTENDERS[shift:] + CONTENDERS[:shift]:
                if round_ >= _runs(plan, contender, hosts):
                    continue
                sample = measure(contender.build(cell), workdir, RUN_TIMEOUT_S)
                results.append(Result(fleet.delay_ms, hosts, contender.key, sample))
                status = f"ERROR {sample.error}" if sample.error else "ok"
                _log(
                    f"{fleet.label} N={hosts} {contender.key} #{round_ + 1}: "
                    f"{sample.wall_s:.2f} s wall, {sample.cpu_s:.2f} s CPU, {status}"
                )
    return results


def help_times(runs: int) -> dict[str, list[float]]:
    """Wall seconds of ``ksm-guard --help`` and ``ksm-guard audit --help``."""
    import subprocess

    ksm_guard = str(Path(sys.executable).parent / "ksm-guard")
    times: dict[str, list[float]] = {}
    for args in (["--help"], ["audit", "--help"]):
        label = " ".join(["ksm-guard", *args])
        times[label] = []
        for _ in range(runs + 1):  # the first one warms the cache and is dropped
            start = time.perf_counter()
            subprocess.run([ksm_guard, *args], capture_output=True, check=True)
            times[label].append(time.perf_counter() - start)
        times[label] = times[label][1:]
    return times


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N = 1, 10; 2 runs; for development")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where to write")
    parser.add_argument("--no-unmerge", action="store_true", help="skip the local-KSM part")
    options = parser.parse_args(argv)
    plan = QUICK if options.quick else FULL
    signal.signal(signal.SIGTERM, _raise_exit)  # so that the fleets' cleanup runs
    if os.geteuid() != 0:
        print("bench: run as root (sshd hosts, /sys/kernel/mm/ksm)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    machine = report.machine_info()
    results: list[Result] = []
    breakdowns: dict[int, list[Breakdown]] = {}
    with tempfile.TemporaryDirectory(prefix="ksm-bench-") as scratch:
        workdir = Path(scratch)
        for delay in plan.delays_ms:
            with Fleet(max(plan.sizes), delay, parent=workdir) as fleet:
                _log(f"fleet up: {fleet.size} sshd hosts, {fleet.label}")
                results += run_matrix(plan, fleet, workdir)
                inventory = fleet.pyinfra_inventory(plan.breakdown_size, workdir / "bd.py")
                breakdowns[delay] = [
                    breakdown(inventory, plan.breakdown_size, fact, plan.breakdown_runs)
                    for fact in ("ksm", "command")
                ]
                _log(f"breakdown done ({fleet.label})")
    imports = import_profile()
    helps = help_times(plan.help_runs)
    _log("help timings done")
    unmerge: UnmergeResult | None = None
    if not options.no_unmerge and (KSM / "run").exists():
        unmerge = measure_unmerge(plan.unmerge_mib, plan.unmerge_repetitions)
        _log("unmerge done")
    elapsed = time.perf_counter() - started

    summary = report.Summary(
        plan=asdict(plan) | {"capped": {f"{k}@{n}": v for (k, n), v in plan.capped.items()}},
        quick=options.quick,
        machine=machine,
        cells=report.summarize([(r.delay_ms, r.hosts, r.tool, r.sample) for r in results]),
        breakdowns={d: [asdict(b) for b in bs] for d, bs in breakdowns.items()},
        imports=imports,
        helps={k: statistics.median(v) for k, v in helps.items()},
        help_max={k: max(v) for k, v in helps.items()},
        unmerge=report.unmerge_summary(unmerge) if unmerge else None,
        elapsed_s=elapsed,
    )
    print(report.text_table(summary))
    report.write(summary, options.docs)
    failed = [c for c in summary.cells if c["errors"]]
    for cell in failed:
        print(
            f"bench: {cell['tool']} N={cell['hosts']} had errors: {cell['errors']}", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
