"""
node_exporter textfile-collector metrics of a run's audits, and their atomic write.

The exposition text is written here rather than by prometheus_client: importing that costs
70-200 ms (measured on the project machine), more than a whole audit of @local; the tests parse
this output back with prometheus_client, metric by metric.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksm_guard.operations.model import Vm
from ksm_guard.operations.report import ACTIVE_STATES, AuditRecord
from ksm_guard.operations.watch import METRICS, TEXTFILE_NAME, escape_label, host_label

if TYPE_CHECKING:
    from .engine import HostResult, RunResult


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{escape_label(value)}"' for key, value in labels.items()) + "}"


def vm_label(vm: Vm | dict[str, Any]) -> str:
    """The ``vmid`` label: the Proxmox VMID, else QEMU's ``-uuid``, else ``pid-<PID>``."""
    return str(vm.get("vmid") or vm.get("uuid") or f"pid-{vm['pid']}")


def _samples(result: HostResult) -> list[tuple[str, str, int]]:
    host = host_label(result.host)
    audit = result.audit
    samples = [("ksm_guard_up", _labels(host=host), 0 if audit is None else 1)]
    if audit is None:
        return samples
    on = _labels(host=host)
    if audit["run"] is not None:
        samples.append(("ksm_guard_run", on, audit["run"]))
    samples += [
        ("ksm_guard_pages_sharing", on, audit["pages_sharing"]),
        ("ksm_guard_saved_bytes", on, audit["saved_bytes"]),
        ("ksm_guard_compliant", on, int(not result.verdict.exposed)),
    ]
    for control in audit["controls"]:
        if control["result"] in ("pass", "fail"):
            labels = _labels(host=host, control=control["id"])
            samples.append(("ksm_guard_control_passed", labels, int(control["result"] == "pass")))
    samples.append(("ksm_guard_waived", on, int(audit["verdict"] == "waived")))
    if audit["systemd"]:
        for unit, state in audit["units"].items():
            active = int(state["present"] and state["active"] in ACTIVE_STATES)
            samples.append(("ksm_guard_unit_active", _labels(host=host, unit=unit), active))
    for vm in audit["vms"]:
        labels = _labels(host=host, vmid=vm_label(vm), name=vm["name"] or "")
        if vm["merged_bytes"] is not None:
            samples.append(("ksm_guard_vm_merged_bytes", labels, vm["merged_bytes"]))
        if vm["allow_ksm"] is not None:
            samples.append(("ksm_guard_vm_restart_pending", labels, int(vm["restart_pending"])))
        within, other = vm.get("merged_within_bytes"), vm.get("shared_with_other_bytes")
        if within is not None:
            samples.append(("ksm_guard_vm_merged_within_bytes", labels, within))
        if other is not None:
            samples.append(("ksm_guard_vm_shared_with_other_bytes", labels, other))
    return samples + _pair_samples(host, audit)


def _pair_samples(host: str, audit: AuditRecord) -> list[tuple[str, str, int]]:
    """
    One gauge per VM pair of the sharing map: each VM's vmid and name as labels, ``_a`` the VM
    with the lower pid.
    """
    samples = []
    for pair in (audit.get("sharing") or {}).get("pairs", []):
        first, second = pair["a"], pair["b"]
        labels = _labels(
            host=host, vmid_a=vm_label(first), name_a=first["name"] or "",
            vmid_b=vm_label(second), name_b=second["name"] or "",
        )  # fmt: skip
        samples.append(("ksm_guard_vm_pair_shared_bytes", labels, pair["bytes"]))
    return samples


def render(result: RunResult) -> str:
    """The exposition text: each metric's HELP and TYPE once, then its samples for every host."""
    samples = [sample for host in result.hosts for sample in _samples(host)]
    lines = []
    for name, (text, kind) in METRICS.items():
        mine = [(labels, value) for metric, labels, value in samples if metric == name]
        if not mine:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value}" for labels, value in mine]
    return "\n".join(lines) + "\n"


class TextfileError(OSError):
    """``ksm_guard.prom`` could not be written; the one there before, if any, is left as it was."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_textfile(directory: Path, text: str) -> Path:
    """
    Write ``text`` to ``directory/ksm_guard.prom`` atomically: a temp file there, then rename.
    On failure (disk full, directory gone or read-only) the old file is untouched, the temp file
    removed, and ``TextfileError`` raised.
    """
    target = directory / TEXTFILE_NAME
    try:
        # node_exporter reads only *.prom: the temp file's name ends otherwise.
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{TEXTFILE_NAME}.", suffix=".tmp")
    except OSError as error:
        raise TextfileError(target, error) from error
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException as error:
        with suppress(OSError):  # a directory gone or read-only now: nothing left to remove
            Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise TextfileError(target, error) from error
        raise
    return target
