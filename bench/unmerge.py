"""The unmerge overhead: ``ksm-guard unmerge`` against a bare ``echo 2 > run``, same merged set.

A workload process maps identical private anonymous pages with ``MADV_MERGEABLE``; ksmd merges
them (``run=1``, many pages per scan, no sleep); merging then stops (``run=0``, pages stay merged)
and one of the two unmerges runs, timed from the controller. The local KSM is shared with other
engineers' tests: every phase that writes ``/sys/kernel/mm/ksm`` holds the lock of
``tests/localksm.py``, which the real-KSM tests take too, and the original ``run``,
``pages_to_scan`` and ``sleep_millisecs`` come back at the end, with ``run`` left at 0.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.localksm import KSM, locked, read, write

PERSIST_PATH = Path("/etc/tmpfiles.d/ksm-guard.conf")
REPO = Path(__file__).resolve().parents[1]
WORKLOAD = REPO / "tests" / "vm" / "workload.py"  # run as a script, not imported
MERGE_TIMEOUT_S = 180.0
NOTHING_MERGED = "ksm-guard unmerge, nothing merged"


@dataclass(frozen=True)
class UnmergeRun:
    """One timed unmerge."""

    tool: str
    seconds: float
    merged_pages: int  # the workload's merged pages before (ksm_merging_pages)
    pages_sharing: int  # the global counter before: other mergeable memory shows here too
    left_pages: int  # the workload's merged pages after


@dataclass(frozen=True)
class UnmergeResult:
    mib: int
    runs: list[UnmergeRun]
    audit_s: float  # median ``ksm-guard audit -i @local``: start, imports, the state read
    lock_wait_s: float  # how long other local-KSM users held the lock first

    def median(self, tool: str) -> float:
        return statistics.median(r.seconds for r in self.runs if r.tool == tool)


def _merging_pages(pid: int) -> int:
    return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())


def _merge(pid: int, want: int) -> int:
    """Run ksmd until the workload has ``want`` merged pages or stops gaining; then stop it."""
    write("run", 1)
    deadline = time.monotonic() + MERGE_TIMEOUT_S
    best, since = 0, time.monotonic()
    while time.monotonic() < deadline:
        pages = _merging_pages(pid)
        if pages >= want:
            break
        if pages > best:
            best, since = pages, time.monotonic()
        elif time.monotonic() - since > 5:
            break  # no progress for 5 s
        time.sleep(0.2)
    write("run", 0)  # merging stops; the merged pages stay merged
    return _merging_pages(pid)


def _timed(argv: list[str], ok: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return seconds


def measure_unmerge(mib: int = 288, repetitions: int = 3) -> UnmergeResult:
    """Alternate the two unmerges ``repetitions`` times each over a ``mib`` MiB merged set.

    A third line, ``ksm-guard unmerge`` with nothing merged (``run=0``, counters 0), is
    ksm-guard's fixed cost: the same start, reads, disable steps and checks, without the unmerge.
    """
    ksm_guard = str(Path(sys.executable).parent / "ksm-guard")
    bare = ["sh", "-c", f"echo 2 > {KSM / 'run'}"]
    ours = [ksm_guard, "unmerge", "-y", "-i", "@local", "--output", "json"]
    audit = [ksm_guard, "audit", "-i", "@local", "--output", "json"]
    audits = [_timed(audit, ok=(0, 1)) for _ in range(3)]
    pages = mib * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    want = pages - 1  # one page stays as the KSM page the others share
    runs: list[UnmergeRun] = []
    persist_existed = PERSIST_PATH.exists()
    workload = subprocess.Popen(
        [sys.executable, str(WORKLOAD), str(mib), "", "900"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if workload.stdout is None or workload.stdout.readline().strip() != "ready":
            raise RuntimeError("the KSM workload did not start")
        waiting = time.perf_counter()
        with locked():
            lock_wait = time.perf_counter() - waiting
            saved = {name: read(name) for name in ("run", "pages_to_scan", "sleep_millisecs")}
            try:
                write("pages_to_scan", 100000)
                write("sleep_millisecs", 0)
                for _ in range(repetitions):
                    for tool, argv in (("echo 2", bare), ("ksm-guard unmerge", ours)):
                        merged = _merge(workload.pid, want)
                        sharing = read("pages_sharing")
                        seconds = _timed(argv)
                        left = _merging_pages(workload.pid)
                        runs.append(UnmergeRun(tool, seconds, merged, sharing, left))
                    write("run", 0)  # nothing merged now: ksm-guard has only its fixed work
                    merged, sharing = _merging_pages(workload.pid), read("pages_sharing")
                    seconds = _timed(ours)
                    runs.append(UnmergeRun(NOTHING_MERGED, seconds, merged, sharing, merged))
            finally:
                write("run", 0)
                write("sleep_millisecs", saved["sleep_millisecs"])
                write("pages_to_scan", saved["pages_to_scan"])
                if not persist_existed:
                    PERSIST_PATH.unlink(missing_ok=True)  # ksm-guard's boot persistence
    finally:
        workload.terminate()
        workload.wait()
    return UnmergeResult(mib, runs, statistics.median(audits), lock_wait)
