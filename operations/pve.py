"""Proxmox VE: the per-VM KSM opt-out (``allow-ksm: 0``, qemu-server 9.0.27 and later)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation

from .ksm import host_state, log_change, needs_root, refusal_command
from .vms import ALLOW_KSM_SINCE, allow_ksm_supported

_HOST_WIDE = "switch KSM off host-wide instead (ksm-guard disable)"


def _label(vmid: str, config: dict[str, Any]) -> str:
    return f"VM {vmid} ({config['name']})" if config.get("name") else f"VM {vmid}"


def _listing(vmids: list[str]) -> str:
    return ", ".join(vmids)


@operation()
def vms_opted_out(vmids: list[int] | None = None) -> Generator[Any, None, None]:
    """
    Opt the host's Proxmox VE VMs out of KSM: ``qm set <vmid> --allow-ksm 0``; never restarts one.

    A running VM keeps sharing its merged pages until a full stop/start (``mem-merge=off`` is a
    QEMU start option): the diff and the audit's ``restart_pending`` name those VMs.

    + vmids: only these VMIDs (default: every VM configured on the host)

    .. code:: python

        pve.vms_opted_out(name="Opt VMs out of KSM", vmids=[100, 101])
    """
    fact = host_state()
    if fact is None:
        return
    version = fact.get("qemu_server")
    if version is None:
        yield refusal_command(
            "vm-optout not supported: not a Proxmox VE host (qemu-server is not installed); "
            + _HOST_WIDE
        )
        return
    if not allow_ksm_supported(version):
        needed = ".".join(str(part) for part in ALLOW_KSM_SINCE)
        yield refusal_command(
            f"vm-optout not supported: qemu-server {version} has no allow-ksm (needs {needed} "
            f"or later, Proxmox VE 9); {_HOST_WIDE}"
        )
        return
    refusal = needs_root(fact)  # /etc/pve is not readable by others: the VMs would look absent
    if refusal:
        yield refusal
        return

    configs: dict[str, dict[str, Any]] = fact.get("pve_configs") or {}
    asked = [str(vmid) for vmid in vmids or []]
    wanted = [vmid for vmid in asked if vmid in configs] if asked else list(configs)
    elsewhere = [vmid for vmid in asked if vmid not in configs]
    not_here = f"; not configured here: VMID {_listing(elsewhere)}" if elsewhere else ""
    if not wanted:
        host.noop(f"no Proxmox VE VM to opt out{not_here or ' (no VM configured)'}")
        return

    running = {vm["vmid"]: vm for vm in fact.get("vms") or [] if vm.get("vmid")}
    restart = [vmid for vmid in wanted if vmid in running and running[vmid]["mem_merge"]]
    todo = [vmid for vmid in wanted if configs[vmid]["allow_ksm"]]
    for vmid in todo:
        after = "; runs with KSM until a stop/start" if vmid in restart else ""
        log_change(f"{_label(vmid, configs[vmid])}: allow-ksm 1 → 0{after}")
    if not todo:
        waiting = f"; VMs needing a stop/start: {_listing(restart)}" if restart else ""
        host.noop(f"allow-ksm is 0 on VM {_listing(wanted)}{waiting}{not_here}")
        return
    for vmid in todo:
        yield StringCommand("qm", "set", QuoteString(vmid), "--allow-ksm", QuoteString("0"))
