"""
The ksm-guard modes, each defined once: ``deploy.py`` and the CLI both run ``run_from_host_data``.

Per host it reads the KSM state once, plans the mode (``operations.plan``), and either fails the
host with the plan's refusal before any operation is added (so ``pyinfra --dry`` fails it too),
or adds the mode's operations: a preflight that re-checks the plan on a fresh read when
executing, then one operation per part of the plan.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import host, logger
from pyinfra.context import ctx_host

from . import ksm, pve
from .model import Mode, Options, SettingsError, settings_from_data
from .plan import HostPlan, RefusalCode, plan, refused

MODES = tuple(mode.value for mode in Mode)
UNMERGE_OPERATION = "Unmerge KSM pages (run=2)"

# The plan each host was prepared with, per pyinfra State: the engine reports it.
_plans: WeakKeyDictionary[Any, dict[Any, HostPlan]] = WeakKeyDictionary()


def planned(state: Any, for_host: Any) -> HostPlan | None:
    """The plan ``for_host`` was prepared with in ``state`` (None: its state was unreadable)."""
    return _plans.get(state, {}).get(for_host)


def _add_operations(mode: Mode, options: Options) -> None:
    """The operations of ``mode``: one place per mode, in the order they run."""
    if mode is Mode.AUDIT:
        ksm.audited(name="Audit KSM", max_fraction=options.max_fraction)
        return
    ksm.preflight(
        name=f"Check the {mode} plan",
        mode=mode.value,
        mask=options.mask,
        force=options.force,
        max_fraction=options.max_fraction,
        vmids=list(options.vmids),
    )
    if mode in (Mode.DISABLE, Mode.UNMERGE):
        ksm.services_disabled(name="Switch off ksmtuned and ksm.service", mask=options.mask)
        ksm.merging_stopped(name="Stop KSM merging (run=0)")
        ksm.boot_persisted(name="Keep KSM off at boot", present=True)
    if mode is Mode.UNMERGE:
        ksm.unmerged(name=UNMERGE_OPERATION, max_fraction=options.max_fraction, force=options.force)
    if mode is Mode.ENABLE:
        ksm.services_enabled(name="Switch ksmtuned back on")
        ksm.boot_persisted(name="Drop the KSM boot persistence", present=False)
    if mode is Mode.VM_OPTOUT:
        pve.vms_opted_out(
            name="Opt Proxmox VE VMs out of KSM (allow-ksm 0)", vmids=list(options.vmids)
        )


def _refuse_now(host_plan: HostPlan) -> None:
    """Fail the current host with the plan's refusal while preparing: nothing will run on it."""
    assert host_plan.refusal is not None
    logger.error(f"{host.print_prefix}{host_plan.refusal.reason}")
    host.state.fail_hosts({ctx_host.get()})


def run_from_host_data() -> None:
    """Plan and add, on the current host, the mode its data names (``ksm_mode``; audit)."""
    plans = _plans.setdefault(host.state, {})
    current = ctx_host.get()
    try:
        mode, options = settings_from_data(host.data)
    except SettingsError as error:
        raw = str(host.data.get("ksm_mode", "audit"))
        mode = Mode(raw) if raw in MODES else Mode.AUDIT
        plans[current] = refused(mode, Options(), RefusalCode.BAD_SETTINGS, str(error))
        _refuse_now(plans[current])
        return
    state = ksm.host_state()
    if state is None:
        return  # pyinfra failed the host already: its fact could not be read
    plans[current] = host_plan = plan(state, mode, options)
    if host_plan.refusal is not None:
        _refuse_now(host_plan)
        return
    _add_operations(mode, options)
