"""
The sharing scan's cost (``audit --vms --sharing``): ``python -m bench.sharing``.

Starts N halted QEMU guests of M MiB each (default 8 x 512 MiB = 4 GiB of preallocated guest RAM,
tests/qemuguests.py: THP off per process), each with 64 MiB of random data loaded (guests in
pairs with the same data), the rest zero-filled. Then times the scan (the perl script the command
sends, over the guests' pids) twice: before ksmd ran (every page exclusively mapped: the
pagemap pass only) and after ksmd merged the guests and stopped (run=0: most pages KSM pages,
every one looked up). Prints guest RAM per second of wall time and per CPU second (user+system
of the perl process). The local KSM is shared: ksmd runs only under tests/localksm.py's lock,
and the knobs come back as they were. The guests are stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ksm_guard.operations.sharing import SCAN_SCRIPT
from tests.qemuguests import Guest, local_ksmd, merge_until_stable, start_guest, stop_guests

DATA_MIB = 64
GIB = 1024**3


@dataclass(frozen=True)
class ScanRun:
    what: str
    guest_bytes: int
    wall_s: float
    cpu_s: float  # user + system of the perl process
    ksm_pages: int  # distinct KSM pages the guests map, as the scan counted them
    pairs: int
    peak_mib: float  # the perl process's peak resident set (its VmHWM, which it prints)

    def line(self) -> str:
        gib = self.guest_bytes / GIB
        return (
            f"{self.what:<28} {gib:5.2f} GiB guest RAM  wall {self.wall_s:6.3f} s "
            f"({gib / self.wall_s:6.2f} GiB/s)  CPU {self.cpu_s:6.3f} s "
            f"({gib / max(self.cpu_s, 1e-6):6.2f} GiB/s per core)  "
            f"{self.ksm_pages} KSM pages, {self.pairs} pairs, perl peak RSS "
            f"{self.peak_mib:.0f} MiB"
        )


def scan(what: str, guests: list[Guest], guest_bytes: int) -> ScanRun:
    """Run the scan once over the guests, as the remote command runs it (perl -e SCRIPT ...)."""
    pids = [str(guest.pid) for guest in sorted(guests, key=lambda g: g.pid)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(
            ["perl", "-e", SCAN_SCRIPT, str(os.sysconf("SC_PAGE_SIZE")), *pids], stdout=out
        )
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"the scan exited {process.returncode}")
        out.seek(0)
        output = out.read().splitlines()
    cpu = usage.ru_utime + usage.ru_stime
    errors = [line for line in output if "error=" in line]
    if errors:
        raise RuntimeError(f"the scan failed: {errors}")
    ksm = sum(int(line.split("ksm=")[1].split()[0]) for line in output if line.startswith("vm "))
    pairs = sum(1 for line in output if line.startswith("pair "))
    peak = int(next(line for line in output if line.startswith("cpu ")).split("peak_kib=")[1])
    return ScanRun(what, guest_bytes, wall, cpu, ksm, pairs, peak / 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The sharing scan's cost on real QEMU guests.")
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--mib", type=int, default=512, help="guest RAM of each guest")
    parser.add_argument("--repetitions", type=int, default=3)
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.sharing: needs root (pagemap PFNs, ksmd)", file=sys.stderr)
        return 2
    guest_bytes = options.guests * options.mib * 1024 * 1024
    runs: list[ScanRun] = []
    with tempfile.TemporaryDirectory(prefix="ksm-guard-bench-sharing-") as temp:
        directory = Path(temp)
        data = []
        for number in range((options.guests + 1) // 2):
            path = directory / f"data{number}.bin"
            path.write_bytes(os.urandom(DATA_MIB << 20))
            data.append(path)
        guests: list[Guest] = []
        try:
            for number in range(options.guests):
                guests.append(
                    start_guest(directory, f"bench{number}", options.mib, data[number // 2])
                )
            print(f"{len(guests)} guests of {options.mib} MiB started", file=sys.stderr)
            for _ in range(options.repetitions):
                runs.append(scan("before merging (exclusive)", guests, guest_bytes))
            with local_ksmd():
                try:
                    start = time.perf_counter()
                    merge_until_stable([guest.pid for guest in guests])
                    print(f"merged in {time.perf_counter() - start:.1f} s", file=sys.stderr)
                    for _ in range(options.repetitions):
                        runs.append(scan("merged (run=0, frozen)", guests, guest_bytes))
                finally:
                    stop_guests(guests)  # before local_ksmd unmerges what is left
        finally:
            stop_guests(guests)
    print(f"sharing scan, {os.cpu_count()} CPU(s), perl {_perl_version()}:")
    for run in runs:
        print("  " + run.line())
    return 0


def _perl_version() -> str:
    return subprocess.run(
        ["perl", "-e", "print $^V"], capture_output=True, text=True, check=False
    ).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
