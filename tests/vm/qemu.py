"""QEMU processes: the binary, telling our daemonized qemus apart, stopping them, the monitor."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.vm.util import VmError

QEMU = "qemu-system-x86_64"
SNAPSHOT_TAG = "booted"


def qemu_version() -> str:
    """Return the first line of ``qemu-system-x86_64 --version``."""
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


def _cmdline(pid: int) -> str:
    """Return the NUL-separated command line of ``pid`` joined by spaces ('' if gone/zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pid_alive(pid: int, marker: str) -> bool:
    """Tell whether ``pid`` runs and its command line contains ``marker`` (zombies are dead)."""
    return marker in _cmdline(pid)


def terminate(pid: int, marker: str, timeout: float = 15.0) -> None:
    """Stop ``pid`` (only if it is ours: ``marker`` in its cmdline): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not pid_alive(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid, marker):
            time.sleep(0.05)
    if pid_alive(pid, marker):
        raise VmError(f"qemu pid {pid} survived SIGKILL")


def process_start(pid: int) -> str:
    """Return the start time of ``pid`` from /proc (``''`` if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def hmp(monitor: Path, command: str, timeout: float = 300.0) -> str:
    """Send one HMP command over the monitor's unix socket and return its output."""
    prompt = b"(qemu) "
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(monitor))
        buffer = b""
        while not buffer.endswith(prompt):
            chunk = sock.recv(4096)
            if not chunk:
                raise VmError(f"monitor {monitor} closed before its prompt")
            buffer += chunk
        sock.sendall(command.encode() + b"\n")
        buffer = b""
        while not buffer.endswith(prompt):
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                raise VmError(f"HMP {command!r} timed out after {timeout:.0f}s") from None
            if not chunk:  # e.g. after "quit"
                break
            buffer += chunk
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", buffer.decode(errors="replace"))
    return text.replace("\r", "").removesuffix("(qemu) ").strip()
