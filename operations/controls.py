"""
The controls a host is judged by, each with a stable ID, decided from its one read.

IDs are never renumbered; a new control gets the next number. KSM-1 to KSM-3 make the host
policy's verdict; KSM-5 and KSM-6 are the per-VM rule the strict policy adds where a per-VM
opt-out exists (Proxmox VE 9's ``allow-ksm``); KSM-4 (boot persistence) is reported and never
changes the verdict.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .model import KSM_RUN_MERGE, PERSIST_PATH, UNITS, HostState, Policy, Verdict
from .report import (
    ACTIVE_STATES,
    ENABLED_STATES,
    allow_ksm_supported,
    counter,
    human_bytes,
    unit_active,
    unit_enabled,
    unit_label,
    unit_present,
    unmerge_need_bytes,
)

Result = Literal["pass", "fail", "skip", "error"]


@dataclass(frozen=True)
class Outcome:
    """One control on one host: its result and the figures behind it, in a sentence."""

    result: Result
    message: str


def shell_name(text: str) -> str:
    """A shell variable name for a KSM file, unit or control: ``ksm.service`` → ``ksm_service``."""
    return re.sub(r"[^A-Za-z0-9]", "_", text)


@dataclass(frozen=True)
class KsmBits:
    """Fails when the KSM file ``name`` has a bit of ``mask`` set (absent KSM: never)."""

    name: str
    mask: int

    def fails(self, state: HostState) -> bool:
        value = (state["ksm"] or {}).get(self.name)
        return isinstance(value, int) and bool(value & self.mask)

    def shell(self) -> str:
        return f"[ $(( ${{ksm_{self.name}:-0}} & {self.mask} )) -ne 0 ]"


@dataclass(frozen=True)
class KsmSum:
    """Fails when the KSM counters ``names`` add up to more than 0 (an absent file counts 0)."""

    names: tuple[str, ...]

    def fails(self, state: HostState) -> bool:
        return sum(counter(state["ksm"], name) for name in self.names) > 0

    def shell(self) -> str:
        terms = " + ".join(f"${{ksm_{name}:-0}}" for name in self.names)
        return f"[ $(( {terms} )) -gt 0 ]"


@dataclass(frozen=True)
class UnitOn:
    """
    Fails when one of ``units`` is present (systemd knows it) and its unit file state is one of
    ``unit_files`` or its active state one of ``active``; never without systemd.
    """

    units: tuple[str, ...]
    unit_files: tuple[str, ...]
    active: tuple[str, ...]

    def fails(self, state: HostState) -> bool:
        if not state["systemd"]:
            return False
        units = state["units"]
        return any(
            unit_present(units.get(name))
            and (unit_enabled(units.get(name)) or unit_active(units.get(name)))
            for name in self.units
        )

    def unit_shell(self, unit: str) -> str:
        """The test for one unit, over ``unit_<name>_load``, ``_file`` and ``_active``."""
        var = f"unit_{shell_name(unit)}"
        states = [
            f'case "${{{var}_{field}:-}}" in {" | ".join(values)}) true ;; *) false ;; esac'
            for field, values in (("file", self.unit_files), ("active", self.active))
            if values
        ]
        return (
            f'{{ [ -n "${{{var}_load:-}}" ] && [ "${{{var}_load}}" != not-found ] && '
            f"{{ {' || '.join(states)}; }}; }}"
        )

    def shell(self) -> str:
        tests = " || ".join(self.unit_shell(unit) for unit in self.units)
        return f'{{ [ "$systemd" = 1 ] && {{ {tests}; }}; }}'


@dataclass(frozen=True)
class NotPersisted:
    """Fails when the boot-persistence file does not hold ksm-guard's line."""

    def fails(self, state: HostState) -> bool:
        return state["persist"] != "present"

    def shell(self) -> str:
        return '[ "$persist" != present ]'


Condition = KsmBits | KsmSum | UnitOn | NotPersisted


@dataclass(frozen=True)
class Rule:
    """
    A host-policy control as data: the condition it fails on, and whether it is judged on a
    kernel without KSM (else skipped there). The Python controls below and the drift watch's
    shell script (operations/watch.py) are both made from these rules.
    """

    condition: Condition
    needs_ksm: bool = False


MERGED_COUNTERS = ("pages_shared", "pages_sharing", "ksm_zero_pages")

# The host policy, once: KSM-1 to KSM-4 by control ID.
HOST_RULES: dict[str, Rule] = {
    "KSM-1": Rule(KsmBits("run", KSM_RUN_MERGE)),
    "KSM-2": Rule(UnitOn(UNITS, ENABLED_STATES, ACTIVE_STATES)),
    "KSM-3": Rule(KsmSum(MERGED_COUNTERS)),
    "KSM-4": Rule(NotPersisted(), needs_ksm=True),
}


def _fails(control: str, state: HostState) -> bool:
    return HOST_RULES[control].condition.fails(state)


@dataclass(frozen=True)
class Control:
    """A check with a stable ID; ``fails_as``: the verdict a failure gives (None: reported only)."""

    id: str
    title: str
    check: Callable[[HostState, Policy], Outcome]
    fails_as: Verdict | None


def _not_merging(state: HostState, policy: Policy) -> Outcome:
    ksm = state["ksm"]
    if ksm is None:
        return Outcome("pass", "the kernel has no KSM: nothing can merge")
    if _fails("KSM-1", state):
        return Outcome("fail", f"run={ksm.get('run')}: ksmd is merging")
    return Outcome("pass", f"run={ksm.get('run')}")


def _no_unit(state: HostState, policy: Policy) -> Outcome:
    if not state["systemd"]:
        return Outcome("pass", "no systemd: no units")
    units = state["units"]
    failing = _fails("KSM-2", state)
    offending = [u for u in UNITS if unit_enabled(units.get(u)) or unit_active(units.get(u))]
    said = ", ".join(f"{name} {unit_label(units.get(name))}" for name in offending or UNITS)
    return Outcome("fail" if failing else "pass", said)


def _no_merged_pages(state: HostState, policy: Policy) -> Outcome:
    ksm = state["ksm"]
    figures = ", ".join(f"{name}={counter(ksm, name)}" for name in MERGED_COUNTERS)
    if not _fails("KSM-3", state):
        return Outcome("pass", figures)
    need = human_bytes(unmerge_need_bytes(state))
    return Outcome("fail", f"{figures}: an unmerge must find {need}")


def _boot_persistence(state: HostState, policy: Policy) -> Outcome:
    if state["ksm"] is None:
        return Outcome("skip", "the kernel has no KSM: nothing to keep off at boot")
    persist = state["persist"]
    if not _fails("KSM-4", state):
        return Outcome("pass", f"{PERSIST_PATH} writes run=0 at every boot")
    if persist == "modified":
        return Outcome("fail", f"{PERSIST_PATH} exists but does not hold ksm-guard's line")
    return Outcome("fail", f"{PERSIST_PATH} is absent: nothing holds run at 0 across a reboot")


def per_vm_rule(state: HostState, policy: Policy) -> str | None:
    """Why the per-VM rule does not apply here (None: it does)."""
    if policy is not Policy.STRICT:
        return "policy host: the per-VM rule is not asked for"
    if not allow_ksm_supported(state.get("qemu_server")):
        version = state.get("qemu_server")
        where = f"qemu-server {version}" if version else "not Proxmox VE"
        return f"no per-VM opt-out here ({where}): strict equals host policy"
    return None


def _vms_opted_out(state: HostState, policy: Policy) -> Outcome:
    skipped = per_vm_rule(state, policy)
    if skipped is not None:
        return Outcome("skip", skipped)
    configs = state.get("pve_configs") or {}
    allowed = [
        vmid
        for vmid, config in configs.items()
        if not config.get("template") and config.get("allow_ksm", True)
    ]
    unread = [vmid for vmid, config in configs.items() if config.get("error")]
    if allowed:
        return Outcome("fail", f"KSM allowed on VM {', '.join(allowed)} (allow-ksm is not 0)")
    note = f"; configs not fully read: VM {', '.join(unread)}" if unread else ""
    return Outcome("pass", f"every VM configured here ({len(configs)}) is opted out{note}")


def _no_restart_pending(state: HostState, policy: Policy) -> Outcome:
    skipped = per_vm_rule(state, policy)
    if skipped is not None:
        return Outcome("skip", skipped)
    pending = [vm["vmid"] or f"pid {vm['pid']}" for vm in state["vms"] if vm["restart_pending"]]
    if pending:
        return Outcome("fail", f"VM {', '.join(pending)} still run with KSM until a stop/start")
    return Outcome("pass", "no running VM waits for a stop/start")


CONTROLS = (
    Control("KSM-1", "ksmd is not merging", _not_merging, Verdict.KSM_RUNNING),
    Control("KSM-2", "no KSM unit enabled or active", _no_unit, Verdict.SERVICE_ENABLED),
    Control("KSM-3", "no merged pages", _no_merged_pages, Verdict.MERGED_PAGES_REMAIN),
    Control("KSM-4", "boot persistence present", _boot_persistence, None),
    Control(
        "KSM-5", "every configured VM opted out (strict)", _vms_opted_out, Verdict.VM_KSM_ALLOWED
    ),
    Control(
        "KSM-6",
        "no VM running with KSM after its opt-out (strict)",
        _no_restart_pending,
        Verdict.VM_RESTART_PENDING,
    ),
)


def evaluate(state: HostState, policy: Policy = Policy.HOST) -> list[tuple[Control, Outcome]]:
    """Every control on ``state``, in ID order."""
    return [(control, control.check(state, policy)) for control in CONTROLS]


def verdict_of(outcomes: list[tuple[Control, Outcome]], supported: bool) -> Verdict:
    """The most severe verdict of the failed controls; compliant (or unsupported) otherwise."""
    failed = [
        control.fails_as
        for control, outcome in outcomes
        if outcome.result == "fail" and control.fails_as is not None
    ]
    if failed:
        order = list(Verdict)
        return max(failed, key=order.index)
    return Verdict.COMPLIANT if supported else Verdict.UNSUPPORTED
