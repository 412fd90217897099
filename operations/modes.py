"""
The ksm-guard modes, each defined once: ``deploy.py`` and the CLI both run ``run_from_host_data``.

Per host it reads the KSM state once, plans the mode (``operations.plan``), and either fails the
host with the plan's refusal before any operation is added (so ``pyinfra --dry`` fails it too),
or adds the mode's operations: a preflight that re-checks the plan on a fresh read when
executing, then one operation per part of the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import host, logger
from pyinfra.context import ctx_host

from . import ksm, pve
from .model import Mode, Options, SettingsError, settings_from_data
from .plan import HostPlan, RefusalCode, plan, refused
from .report import waiver_line

MODES = tuple(mode.value for mode in Mode)
UNMERGE_OPERATION = "Unmerge KSM pages (run=2)"

# The plan each host was prepared with, per pyinfra State: the engine reports it.
_plans: WeakKeyDictionary[Any, dict[Any, HostPlan]] = WeakKeyDictionary()


def planned(state: Any, for_host: Any) -> HostPlan | None:
    """The plan ``for_host`` was prepared with in ``state`` (None: its state was unreadable)."""
    return _plans.get(state, {}).get(for_host)


@dataclass(frozen=True)
class Call:
    """One operation of a mode: its name in pyinfra's output, and its arguments from options."""

    name: str
    operation: Any  # a pyinfra @operation
    arguments: Callable[[Options], dict[str, Any]] = lambda options: {}


def _preflight(mode: Mode) -> Call:
    return Call(
        f"Check the {mode} plan",
        ksm.preflight,
        lambda o: {
            "mode": mode.value,
            "mask": o.mask,
            "force": o.force,
            "max_fraction": o.max_fraction,
            "vmids": list(o.vmids),
        },
    )


_DISABLE = (
    Call("Switch off ksmtuned and ksm.service", ksm.services_disabled, lambda o: {"mask": o.mask}),
    Call("Stop KSM merging (run=0)", ksm.merging_stopped),
    Call("Keep KSM off at boot", ksm.boot_persisted, lambda o: {"present": True}),
)


def _watch(present: bool | None) -> Callable[[Options], dict[str, Any]]:
    def arguments(o: Options) -> dict[str, Any]:
        return {
            "present": present if present is not None else (True if o.watch else None),
            "host_label": o.watch_host,
            "interval": o.watch_interval,
            "heal": o.watch_heal,
            "textfile_dir": o.watch_textfile_dir,
        }

    return arguments


_WATCH = Call("Install the drift watch", ksm.watch_installed, _watch(None))

# Each mode's operations, in the order they run: the one place a mode is defined.
OPERATIONS: dict[Mode, tuple[Call, ...]] = {
    Mode.AUDIT: (
        Call(
            "Audit KSM",
            ksm.audited,
            lambda o: {"max_fraction": o.max_fraction, "policy": o.policy.value},
        ),
    ),
    Mode.DISABLE: (_preflight(Mode.DISABLE), *_DISABLE, _WATCH),
    Mode.UNMERGE: (
        _preflight(Mode.UNMERGE),
        *_DISABLE,
        Call(
            UNMERGE_OPERATION,
            ksm.unmerged,
            lambda o: {"max_fraction": o.max_fraction, "force": o.force},
        ),
        _WATCH,
    ),
    Mode.ENABLE: (
        _preflight(Mode.ENABLE),
        Call("Switch ksmtuned back on", ksm.services_enabled),
        Call("Drop the KSM boot persistence", ksm.boot_persisted, lambda o: {"present": False}),
        Call("Remove the drift watch", ksm.watch_installed, _watch(False)),
    ),
    Mode.VM_OPTOUT: (
        _preflight(Mode.VM_OPTOUT),
        Call(
            "Opt Proxmox VE VMs out of KSM (allow-ksm 0)",
            pve.vms_opted_out,
            lambda o: {"vmids": list(o.vmids)},
        ),
    ),
}


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
        mode, options = settings_from_data(host.data, current.name)
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
    if host_plan.waived and options.waiver is not None:
        logger.warning(f"{host.print_prefix}{waiver_line(options.waiver)}")
        return
    for call in OPERATIONS[mode]:
        call.operation(name=call.name, **call.arguments(options))
