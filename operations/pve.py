"""Proxmox VE: the per-VM KSM opt-out (``allow-ksm: 0``, qemu-server 9.0.27 and later)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from pyinfra.api import operation

from . import plan as planner
from .ksm import apply, host_state


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
    state = host_state()
    if state is not None:
        yield from apply(planner.vms_opted_out(state, tuple(vmids or ())))
