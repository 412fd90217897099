"""What every part of the VM harness shares: its error, progress log and checked commands."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CONSOLE_TAIL_LINES = 40


class VmError(RuntimeError):
    """A VM could not be built, started, reached or stopped."""


_T0 = time.monotonic()


def log(message: str) -> None:
    """Print a progress line with the time since import to stderr."""
    print(f"[ksm-guard-vm {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log how long the block took (and record it in ``timings``)."""
    start = time.monotonic()
    log(f"{what} ...")
    yield
    elapsed = time.monotonic() - start
    if timings is not None:
        timings[what] = round(elapsed, 2)
    log(f"{what}: {elapsed:.1f}s")


def tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None) -> str:
    """Run a command; return its stdout, or raise VmError with its output's tail."""
    args = [str(part) for part in cmd]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise VmError(
            f"command failed ({proc.returncode}): {shlex.join(args)}\n"
            f"{tail(proc.stdout + proc.stderr)}"
        )
    return proc.stdout
