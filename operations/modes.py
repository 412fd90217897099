"""The ksm-guard modes, each defined once: ``deploy.py`` and the CLI both run these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyinfra import host

from . import ksm, pve
from .report import DEFAULT_MAX_FRACTION

MODES = ("audit", "disable", "unmerge", "enable", "vm-optout")
CHANGING_MODES = ("disable", "unmerge", "enable", "vm-optout")


@dataclass(frozen=True)
class Options:
    """From host data: ``ksm_mask``, ``ksm_force``, ``ksm_max_fraction``, ``ksm_vmids``."""

    mask: bool = False
    force: bool = False
    max_fraction: float = DEFAULT_MAX_FRACTION
    vmids: tuple[int, ...] = ()


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{key} must be true or false, not {value!r}")


def _fraction(value: Any) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise ValueError(f"ksm_max_fraction must be a number in (0, 1], not {value!r}")
    return fraction


def _vmids(value: Any) -> tuple[int, ...]:
    """VMIDs from a list or a comma-separated string (``--data ksm_vmids=100,101``)."""
    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    try:
        vmids = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        vmids = (0,)
    if any(not 100 <= vmid <= 999_999_999 for vmid in vmids):
        raise ValueError(f"ksm_vmids must be Proxmox VE VMIDs (100 to 999999999), not {value!r}")
    return vmids


def options_from_data(data: Any) -> Options:
    """Read the options from pyinfra host data; ``ValueError`` names a bad value."""
    return Options(
        mask=_flag("ksm_mask", data.get("ksm_mask", False)),
        force=_flag("ksm_force", data.get("ksm_force", False)),
        max_fraction=_fraction(data.get("ksm_max_fraction", DEFAULT_MAX_FRACTION)),
        vmids=_vmids(data.get("ksm_vmids", ())),
    )


def audit(options: Options) -> None:
    """Report the verdict; change nothing."""
    ksm.audited(name="Audit KSM", max_fraction=options.max_fraction)


def disable(options: Options) -> None:
    """Switch the units off, stop merging, and keep it off at boot."""
    ksm.services_disabled(name="Switch off ksmtuned and ksm.service", mask=options.mask)
    ksm.merging_stopped(name="Stop KSM merging (run=0)")
    ksm.boot_persisted(name="Keep KSM off at boot", present=True)


def unmerge(options: Options) -> None:
    """Everything ``disable`` does, then unmerge the merged pages (``run=2``)."""
    disable(options)
    ksm.unmerged(
        name="Unmerge KSM pages (run=2)", max_fraction=options.max_fraction, force=options.force
    )


def enable(options: Options) -> None:
    """Roll back: units on again, boot persistence removed."""
    ksm.services_enabled(name="Switch ksmtuned back on")
    ksm.boot_persisted(name="Drop the KSM boot persistence", present=False)


def vm_optout(options: Options) -> None:
    """Proxmox VE: allow-ksm 0 on the VMs (all, or ``ksm_vmids``); no VM is restarted."""
    pve.vms_opted_out(name="Opt Proxmox VE VMs out of KSM (allow-ksm 0)", vmids=list(options.vmids))


RUNNERS = {
    "audit": audit,
    "disable": disable,
    "unmerge": unmerge,
    "enable": enable,
    "vm-optout": vm_optout,
}


def run_from_host_data() -> None:
    """Run, on the current host, the mode its data names in ``ksm_mode`` (default: audit)."""
    mode = str(host.data.get("ksm_mode", "audit"))
    runner = RUNNERS.get(mode)
    if runner is None:
        ksm.rejected(
            name="Check ksm-guard settings",
            reason=f"unknown ksm_mode {mode!r}: choose one of {', '.join(MODES)}",
        )
        return
    try:
        options = options_from_data(host.data)
    except ValueError as error:
        ksm.rejected(name="Check ksm-guard settings", reason=str(error))
        return
    runner(options)
