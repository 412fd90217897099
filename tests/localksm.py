"""This machine's kernel KSM, for the real-KSM tests and the benchmark: sysfs and a lock."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KSM = Path("/sys/kernel/mm/ksm")
# Every user of this machine's KSM that writes sysfs holds this lock for the duration: the
# real-KSM tests, the benchmark, and parallel sessions of either.
LOCK_PATH = Path("/tmp/ksm-guard-localksm.lock")


def read(name: str) -> int:
    """A KSM counter or knob, read straight from sysfs (not through ksm-guard)."""
    return int((KSM / name).read_text().split()[0])


def write(name: str, value: int) -> None:
    (KSM / name).write_text(f"{value}\n")


@contextmanager
def locked() -> Iterator[None]:
    """Hold the machine-wide lock the other local-KSM users take before changing sysfs."""
    with LOCK_PATH.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
