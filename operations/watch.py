"""
The drift watch on a host: where its files live, how it is configured, and the ``watch`` fact
section that reads whether it is installed and when it last ran.

The watch itself (its shell script and systemd units) is made in ``operations/watchscript.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from pyinfra.api.exceptions import FactProcessError

from .model import WatchState, host_label

__all__ = ["host_label"]
from .vms import parse_error, parse_int

SCRIPT_PATH = "/usr/local/sbin/ksm-guard-watch"
SERVICE = "ksm-guard-watch.service"
TIMER = "ksm-guard-watch.timer"
UNIT_DIR = "/etc/systemd/system"
SERVICE_PATH = f"{UNIT_DIR}/{SERVICE}"
TIMER_PATH = f"{UNIT_DIR}/{TIMER}"
# Written by every run of the watch: its last run, heal count, interval and metrics file.
STATE_PATH = "/var/lib/ksm-guard/watch.state"
FILES = (SCRIPT_PATH, SERVICE_PATH, TIMER_PATH)
# The directory Debian's prometheus-node-exporter reads textfile metrics from.
DEFAULT_TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
DEFAULT_INTERVAL = 300  # seconds
TEXTFILE_NAME = "ksm_guard.prom"

# The metrics of ``-o prometheus`` and the watch, in the order they are written.
# name: (help, metric type)
METRICS = {
    "ksm_guard_up": ("1 when ksm-guard could read the host's KSM state, else 0.", "gauge"),
    "ksm_guard_run": ("/sys/kernel/mm/ksm/run: 0 stopped, 1 merging, 2 unmerged.", "gauge"),
    "ksm_guard_pages_sharing": ("KSM pages_sharing: extra mappings of merged pages.", "gauge"),
    "ksm_guard_saved_bytes": ("Bytes KSM saves (pages_sharing + ksm_zero_pages).", "gauge"),
    "ksm_guard_compliant": ("1 when the verdict is compliant or unsupported, else 0.", "gauge"),
    "ksm_guard_unit_active": ("1 when the KSM unit is active (running), else 0.", "gauge"),
    "ksm_guard_control_passed": (
        "1 when the control (KSM-1...) passes, 0 when it fails; absent when it does not apply.",
        "gauge",
    ),
    "ksm_guard_waived": ("1 while a waiver keeps this exposed host compliant, else 0.", "gauge"),
    "ksm_guard_vm_merged_bytes": ("Bytes of a running VM's memory merged by KSM.", "gauge"),
    "ksm_guard_vm_restart_pending": (
        "1 when a VM's allow-ksm differs from how its QEMU runs until a stop/start.",
        "gauge",
    ),
    # audit --sharing only
    "ksm_guard_vm_pair_shared_bytes": (
        "Bytes of distinct physical KSM pages two running VMs both map (audit --sharing).",
        "gauge",
    ),
    "ksm_guard_vm_merged_within_bytes": (
        "Bytes of distinct KSM pages only this VM maps (audit --sharing).",
        "gauge",
    ),
    "ksm_guard_vm_shared_with_other_bytes": (
        "Bytes of distinct KSM pages this VM maps that a process other than a VM maps too "
        "(audit --sharing).",
        "gauge",
    ),
}
WATCH_METRICS = {
    "ksm_guard_watch_last_run_timestamp_seconds": (
        "When the ksm-guard drift watch last ran on this host (seconds since the epoch).",
        "gauge",
    ),
    "ksm_guard_watch_heals_total": (
        "Times the ksm-guard drift watch switched KSM back off on this host.",
        "counter",
    ),
}


def escape_label(value: str) -> str:
    """A label value as the exposition format writes it: backslash, newline and quote escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# A watch whose last run is older than this many intervals is stale.
STALE_INTERVALS = 2


@dataclass(frozen=True)
class WatchConfig:
    """How the watch runs on a host: its ``host`` label, interval (s), heal, textfile dir."""

    host: str
    interval: int = DEFAULT_INTERVAL
    heal: bool = False
    textfile_dir: str = DEFAULT_TEXTFILE_DIR

    def describe(self) -> str:
        heal = "heals drift" if self.heal else "reports only"
        return f"every {self.interval} s, {heal}, metrics in {self.textfile_dir}/ksm_guard.prom"


# ``now=``, then ``sha256=<hash>  <path>`` for each file present, then the state file's lines.
WATCH_COMMAND = "; ".join(
    (
        'echo "now=$(date +%s)"',
        f'for f in {" ".join(FILES)}; do ! test -e "$f" || echo "sha256=$(sha256sum "$f")"; done',
        # Readable by all (the script writes it 0644): a non-root audit reads it too.
        f"! test -r {STATE_PATH} || sed 's/^/state./' {STATE_PATH}",
    )
)

_STATE_KEYS = ("last_run", "heals", "interval", "textfile")


def parse_watch(lines: list[str]) -> WatchState:
    """The ``watch`` section's lines as a ``WatchState``."""
    watch: WatchState = {
        "now": 0,
        "files": {},
        "last_run": None,
        "heals": 0,
        "interval": None,
        "textfile": None,
    }
    seen_now = False
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise parse_error(line, "a watch line")
        if key == "now":
            watch["now"] = parse_int(value, line, "the host's clock")
            seen_now = True
        elif key == "sha256":
            digest, _, path = value.partition("  ")
            if len(digest) != 64 or path not in FILES:
                raise parse_error(line, "a watch file checksum")
            watch["files"][path] = digest
        elif key.startswith("state.") and key[6:] in _STATE_KEYS:
            name = key[6:]
            if name == "textfile":
                watch["textfile"] = value or None
            elif name == "heals":
                watch["heals"] = parse_int(value, line, "the watch heal count")
            elif name == "last_run":
                watch["last_run"] = parse_int(value, line, "the watch's last run")
            else:
                watch["interval"] = parse_int(value, line, "the watch interval")
        elif not key.startswith("state."):
            raise parse_error(line, "a watch line")
    if not seen_now:
        raise FactProcessError("ksm-guard fact output lacks the host's clock in its watch section")
    return watch


class WatchRecord(TypedDict):
    """The audit's ``watch`` field (None when the fact had no watch section)."""

    installed: bool  # the script and both units are present
    last_run: int | None  # seconds since the epoch, by the host's clock
    age_seconds: int | None
    interval: int | None
    heals: int
    stale: bool  # installed, and never ran or last ran more than two intervals ago
    finding: str | None  # what is wrong with the watch, in a sentence


def watch_record(watch: WatchState | None) -> WatchRecord | None:
    """What the audit says of a host's watch."""
    if watch is None:
        return None
    installed = all(path in watch["files"] for path in FILES)
    last_run, interval = watch["last_run"], watch["interval"]
    age = None if last_run is None else watch["now"] - last_run
    finding = None
    if installed and (age is None or interval is None):
        finding = "the drift watch is installed but has never run"
    elif installed and age is not None and interval is not None:
        if age > STALE_INTERVALS * interval:
            finding = f"the drift watch is stale: last run {age} s ago, every {interval} s"
    elif watch["files"]:
        missing = ", ".join(path for path in FILES if path not in watch["files"])
        finding = f"the drift watch is incomplete: {missing} missing"
    return {
        "installed": installed,
        "last_run": last_run,
        "age_seconds": age,
        "interval": interval,
        "heals": watch["heals"],
        "stale": installed and finding is not None,
        "finding": finding,
    }
