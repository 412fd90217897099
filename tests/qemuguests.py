"""
Real QEMU processes as KSM workloads with known content, for the sharing-map tests and bench.

Each guest is ``qemu-system-x86_64 -S`` (vCPUs halted: no guest code runs, no CPU used) with
preallocated guest RAM, QEMU's default ``mem-merge=on`` (MADV_MERGEABLE) and optionally a file
put into guest RAM by the generic loader (``-device loader,file=…,addr=…,force-raw=on``: QEMU
copies it in at the machine's reset, which happens before ``-S`` stops, so the bytes are in RAM
when ``-daemonize`` returns). Transparent huge pages are switched off per process, not for the
machine: ``prctl(PR_SET_THP_DISABLE)`` before exec is inherited by QEMU and its daemonized child
(``THP_enabled: 0`` in /proc/PID/status), since with THP this kernel's ksmd merges almost none
of QEMU's RAM (../shared/notes/ksm-facts.md). ksmd runs only under ``tests/localksm.py``'s lock,
and its knobs come back as they were.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.localksm import locked, read, write

PR_SET_THP_DISABLE = 41  # include/uapi/linux/prctl.h
LOAD_ADDR = 0x1000000  # 16 MiB into guest RAM: above the BIOS areas of the pc machine
MERGE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Guest:
    name: str
    pid: int


def _no_thp() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


def start_guest(directory: Path, name: str, mib: int, data: Path | None = None) -> Guest:
    """One halted QEMU guest of ``mib`` MiB, ``data`` loaded at LOAD_ADDR; returns when it runs."""
    pidfile = directory / f"{name}.pid"
    command = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(mib), "-mem-prealloc", "-S",
        "-display", "none", "-nodefaults", "-name", name, "-daemonize", "-pidfile", str(pidfile),
    ]  # fmt: skip
    if data is not None:
        command += ["-device", f"loader,file={data},addr={LOAD_ADDR:#x},force-raw=on"]
    subprocess.run(command, check=True, preexec_fn=_no_thp, timeout=120, capture_output=True)
    return Guest(name, int(pidfile.read_text().strip()))


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_guests(guests: list[Guest]) -> None:
    """SIGTERM each guest and wait until its process is gone (they are not our children)."""
    for guest in guests:
        try:
            os.kill(guest.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 30
    for guest in guests:
        while _alive(guest.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(guest.pid):
            os.kill(guest.pid, signal.SIGKILL)


def merging_pages(pid: int) -> int:
    return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())


def merge_until_stable(pids: list[int]) -> None:
    """With the lock held: run ksmd until no guest gains merged pages over two full scans."""
    write("pages_to_scan", 20000)
    write("sleep_millisecs", 10)
    write("run", 1)
    deadline = time.monotonic() + MERGE_TIMEOUT_S
    before: list[int] = []
    while time.monotonic() < deadline:
        scans = read("full_scans")
        while read("full_scans") < scans + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        now = [merging_pages(pid) for pid in pids]
        if now == before and all(now):
            break
        before = now
    write("run", 0)  # frozen: merged pages stay as they are until an unmerge


@contextmanager
def local_ksmd() -> Iterator[None]:
    """
    Hold the local-KSM lock for the block. Afterwards (stop the guests inside the block first)
    unmerge what is left (``run=2``: an exited process's KSM pages stay counted until then) and
    restore ``run``, ``pages_to_scan`` and ``sleep_millisecs``.
    """
    with locked():
        knobs = {name: read(name) for name in ("run", "pages_to_scan", "sleep_millisecs")}
        try:
            yield
        finally:
            write("run", 0)
            write("run", 2)
            write("run", 0)
            write("pages_to_scan", knobs["pages_to_scan"])
            write("sleep_millisecs", knobs["sleep_millisecs"])
            if knobs["run"] != 0:
                write("run", knobs["run"])


@contextmanager
def merged_guests(
    directory: Path, specs: list[tuple[str, int, Path | None]]
) -> Iterator[list[Guest]]:
    """
    Start the guests ``(name, MiB, data)``, merge them with the local ksmd and freeze it
    (``run=0``), all under the lock; afterwards stop them and restore ksmd (``local_ksmd``).
    """
    with local_ksmd():
        guests: list[Guest] = []
        try:
            for name, mib, data in specs:
                guests.append(start_guest(directory, name, mib, data))
            merge_until_stable([guest.pid for guest in guests])
            yield guests
        finally:
            stop_guests(guests)
