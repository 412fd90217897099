"""Guest-side KSM workload: identical private pages marked mergeable, held until killed."""

# Runs with the guest's python3 (stdlib only). Usage: workload.py MIB [PIDFILE] [LIFETIME_S] [FILL]
# (FILL: the byte value every page holds, 0-255; 0 gives zero pages, for use_zero_pages; or
# ``pages:SEED``: every page different, page i starting with SEED and i, so that two workloads
# with the same SEED merge page for page and with nothing else). Later arguments that are not
# a FILL are ignored: tests/integration/test_vms.py appends QEMU's.

from __future__ import annotations

import mmap
import os
import signal
import struct
import sys
import time

FILL_BYTE = 0x5A  # non-zero: zero pages take another path (use_zero_pages)
CHUNK = 1024 * 1024
DEFAULT_LIFETIME_S = 3600


def allocate(mib: int, fill: int = FILL_BYTE, seed: int | None = None) -> mmap.mmap:
    """Map ``mib`` MiB of private anonymous memory, fill it with ``fill`` (each page headed by
    ``seed`` and its index when a seed is given), mark it mergeable."""
    size = mib * 1024 * 1024
    # MAP_PRIVATE is essential: KSM silently ignores MADV_MERGEABLE on shared mappings,
    # and mmap.mmap(-1, n) is MAP_SHARED by default.
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    chunk = bytes([fill]) * CHUNK
    for offset in range(0, size, CHUNK):
        area[offset : offset + CHUNK] = chunk[: size - offset]
    if seed is not None:
        for index, offset in enumerate(range(0, size, mmap.PAGESIZE)):
            area[offset : offset + 16] = struct.pack("<QQ", seed, index)
    area.madvise(mmap.MADV_MERGEABLE)
    return area


def main(argv: list[str]) -> int:
    """Allocate, report readiness, then sleep until killed (or the lifetime runs out)."""
    mib = int(argv[1]) if len(argv) > 1 else 64
    pidfile = argv[2] if len(argv) > 2 else ""
    lifetime = float(argv[3]) if len(argv) > 3 else DEFAULT_LIFETIME_S
    fill, seed = FILL_BYTE, None
    if len(argv) > 4 and argv[4].isdigit():
        fill = int(argv[4])
    elif len(argv) > 4 and argv[4].startswith("pages:"):
        seed = int(argv[4].partition(":")[2])
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    area = allocate(mib, fill, seed)
    if pidfile:
        with open(pidfile, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    print("ready", flush=True)
    time.sleep(lifetime)  # bounded: a forgotten workload frees its memory eventually
    area.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
