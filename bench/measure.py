"""Run one controller command and measure it: wall time, CPU time, peak memory.

CPU time is the ``wait4`` rusage of the command: its own user+sys time plus that of every
descendant it waited for (ssh processes, Ansible's forks). Memory is the peak sum of the resident
sets of the whole process tree, sampled every 0.05 s from ``/proc`` by a thread of this process
(not counted as controller CPU). ``ru_maxrss`` is no use here: a child forked from this Python
process inherits its high-water mark, so every command would show at least ~50 MiB.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .tools import Invocation

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SAMPLE_S = 0.05


@dataclass(frozen=True)
class Sample:
    """One run of one command."""

    wall_s: float
    cpu_s: float
    tree_rss_mib: float  # peak sum over the process tree (sampled)
    exit_code: int
    error: str | None


def _tree_rss_kib(root: int) -> int:
    """Sum of the resident sets of ``root`` and its descendants, from /proc/PID/stat."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        rss[pid] = int(fields[21])
    total = 0
    for pid in rss:
        walk = pid
        while walk > 1 and walk != root:
            walk = parents.get(walk, 0)
        if walk == root:
            total += rss[pid]
    return total * PAGE_KIB


def measure(invocation: Invocation, workdir: Path, timeout_s: float) -> Sample:
    """Run ``invocation`` once; its stdout is kept in ``workdir/stdout`` for ``check``."""
    stdout_path, stderr_path = workdir / "stdout", workdir / "stderr"
    env = {**os.environ, **invocation.env}
    with contextlib.ExitStack() as files:
        stdin = files.enter_context(invocation.stdin.open("rb")) if invocation.stdin else None
        out = files.enter_context(stdout_path.open("wb"))
        err = files.enter_context(stderr_path.open("wb"))
        start = time.perf_counter()
        process = subprocess.Popen(
            invocation.argv,
            stdin=stdin or subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        peak = [0]
        done = threading.Event()
        timed_out = [False]

        def sample() -> None:
            deadline = time.monotonic() + timeout_s
            while not done.wait(SAMPLE_S):
                peak[0] = max(peak[0], _tree_rss_kib(process.pid))
                if time.monotonic() > deadline:
                    timed_out[0] = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    # Sessions the command left behind (none should) must not outlive the measurement.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    stdout = stdout_path.read_text(errors="replace")
    stderr = stderr_path.read_text(errors="replace")
    if timed_out[0]:
        error: str | None = f"timed out after {timeout_s:.0f} s"
    else:
        try:
            error = invocation.check(process.returncode, stdout, stderr)
        except ValueError as problem:  # unparsable output
            error = f"exit {process.returncode}, bad output: {problem}"
    if error:
        tail = stderr.strip().splitlines()[-3:]
        error = "; ".join([error, *tail])
    return Sample(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        tree_rss_mib=peak[0] / 1024,
        exit_code=process.returncode,
        error=error,
    )
