"""Which accelerator the guests get: KVM where a stock Debian kernel really boots, else TCG."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tests.vm.qemu import QEMU
from tests.vm.util import log

PROBE_TIMEOUT_S = 20.0


def accel_args(accel: str) -> list[str]:
    """Return QEMU's accelerator and CPU arguments."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]


def detect_accel(kernel: Path, memo_dir: Path) -> str:
    """Return ``kvm`` when ``kernel`` really boots under KVM here, else ``tcg``.

    ``KSM_GUARD_VM_ACCEL`` (``kvm``/``tcg``) skips the probe; its result is remembered in
    ``memo_dir`` per host kernel and CPU model.
    """
    forced = os.environ.get("KSM_GUARD_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cpu = re.search(r"(?m)^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text())
    host = f"{os.uname().release}|{cpu.group(1) if cpu else '?'}"
    memo = memo_dir / f"accel-{hashlib.sha256(host.encode()).hexdigest()[:12]}.json"
    if memo.exists():
        return str(json.loads(memo.read_text())["accel"])
    # Boot the kernel without a root disk: with working KVM it panics on the missing root in
    # about a second; kvm_pvm-style KVM hangs, crawls or fails on a stock kernel.
    accel = "tcg"
    with tempfile.TemporaryDirectory(prefix="ksm-guard-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        cmd = [
            QEMU, *accel_args("kvm"), "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/ksm-guard-probe",
            "-serial", f"file:{console}",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        text = console.read_text(errors="replace") if console.exists() else ""
        if "Linux version" in text and "Kernel panic" in text:
            accel = "kvm"
        log(f"KVM probe: {accel} ({time.monotonic() - start:.1f}s)")
    memo.write_text(json.dumps({"accel": accel, "host": host}))
    return accel
