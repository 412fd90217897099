"""
What each ksm-guard mode would do to a host, decided from one read of its state.

Pure: no pyinfra, no I/O. ``plan(state, mode, options)`` returns the steps (each with its
from → to line and its commands) or the refusal with its reason and figures. The operations turn
the steps into pyinfra commands; dry runs, prompts and real runs all show this same plan.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum

from .model import (
    ALLOW_KSM_SINCE,
    KSM_DIR,
    PERSIST_LINE,
    PERSIST_PATH,
    RUN_PATH,
    UNITS,
    HostState,
    Mode,
    Options,
    Status,
    Unit,
    utc_today,
)
from .report import (
    allow_ksm_supported,
    counter,
    human_bytes,
    merged_page_count,
    merging,
    offlining,
    unit_active,
    unit_enabled,
    unit_label,
    unit_present,
    unmerge_allowed_bytes,
    unmerge_need_bytes,
)
from .watch import (
    FILES,
    SCRIPT_PATH,
    SERVICE,
    SERVICE_PATH,
    STATE_PATH,
    TIMER,
    TIMER_PATH,
    WatchConfig,
)
from .watchscript import watch_files

# The unmerge runs detached from the SSH session: a dropped connection (SIGHUP) must not
# interrupt the synchronous write, and the counters prove the result afterwards.
UNMERGE_SCRIPT = """\
f="$1"
r=$(cat "$f/run") || exit 1
if [ $((r & 2)) -ne 0 ]; then echo 0 > "$f/run" || exit 1; fi
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  systemd-run --quiet --wait --collect --service-type=oneshot \\
    --description='ksm-guard unmerge' sh -c 'echo 2 > "$1"' ksm-guard-unmerge "$f/run"
else
  setsid -w sh -c 'trap "" HUP; echo 2 > "$1"' ksm-guard-unmerge "$f/run" </dev/null
fi
rc=$?
shared=$(cat "$f/pages_shared"); sharing=$(cat "$f/pages_sharing")
if [ "$shared" != 0 ] || [ "$sharing" != 0 ]; then
  echo "unmerge incomplete: pages_shared=$shared pages_sharing=$sharing remain" \\
    "(writer exit $rc); run unmerge again" >&2
  exit 1
fi
"""


_HOST_WIDE = "switch KSM off host-wide instead (ksm-guard disable)"


class Part(StrEnum):
    """A piece of a mode, carried out by one operation."""

    UNITS_OFF = "units-off"  # ksm.services_disabled
    MERGING = "merging"  # ksm.merging_stopped
    PERSIST = "persist"  # ksm.boot_persisted
    UNMERGE = "unmerge"  # ksm.unmerged
    UNITS_ON = "units-on"  # ksm.services_enabled
    VM_OPTOUT = "vm-optout"  # pve.vms_opted_out
    WATCH = "watch"  # ksm.watch_installed


class RefusalCode(StrEnum):
    """Why a host is refused: it changes nothing on it."""

    NOT_ROOT = "not-root"
    UNSAFE_UNMERGE = "unsafe-unmerge"
    NOT_PROXMOX = "not-proxmox"
    NO_ALLOW_KSM = "qemu-server-too-old"
    VM_LOCKED = "vm-locked"  # every VM vm-optout would change is locked
    BAD_SETTINGS = "bad-settings"


@dataclass(frozen=True)
class Command:
    """One shell command: its words, and the file its output goes to (``> file``)."""

    argv: tuple[str, ...]
    stdout_to: str | None = None

    def __str__(self) -> str:
        text = shlex.join(self.argv)
        return f"{text} > {shlex.quote(self.stdout_to)}" if self.stdout_to else text


@dataclass(frozen=True)
class Step:
    """One change: its from → to line, the commands that make it, and its figures."""

    part: Part
    change: str
    commands: tuple[Command, ...]
    figures: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """A preflight said no: the reason shown to the operator, and the figures behind it."""

    code: RefusalCode
    reason: str
    figures: Mapping[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class PartPlan:
    """One operation's share of a plan: steps, or the state sentence when there are none."""

    part: Part
    steps: tuple[Step, ...] = ()
    noop: str | None = None
    refusal: Refusal | None = None
    skipped: tuple[str, ...] = ()  # left as they are, with why (a locked VM): counts as refused


@dataclass(frozen=True)
class HostPlan:
    """A mode's plan for one host: its parts, and the refusal that stops all of them."""

    mode: Mode
    options: Options
    parts: tuple[PartPlan, ...] = ()
    refusal: Refusal | None = None
    waived: bool = False  # under an active waiver: a changing mode leaves the host as it is

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(step for part in self.parts for step in part.steps)

    @property
    def skipped(self) -> tuple[str, ...]:
        """What the steps leave as it is (a locked VM): the rest changes, the host counts as
        refused for the exit code and the rollout."""
        return tuple(item for part in self.parts for item in part.skipped)

    @property
    def changes(self) -> list[str]:
        """The from → to lines, in the order they would run."""
        return [step.change for step in self.steps]

    @property
    def status(self) -> Status:
        """``refused``, ``waived``, ``would-change`` or ``ok``."""
        if self.refusal is not None:
            return Status.REFUSED
        if self.waived:
            return Status.WAIVED
        return Status.WOULD_CHANGE if self.steps else Status.OK

    def part(self, name: Part) -> PartPlan | None:
        return next((part for part in self.parts if part.part is name), None)


def _needs_root(state: HostState) -> Refusal | None:
    if state["uid"] == 0:
        return None
    return Refusal(
        RefusalCode.NOT_ROOT,
        f"permission denied: connected as uid {state['uid']}; changing KSM needs root "
        "(use --sudo or _sudo=True)",
        {"uid": state["uid"]},
    )


def _changing(part: Part, state: HostState, steps: list[Step], noop: str) -> PartPlan:
    """Steps need root; without steps the part is a no-op described by ``noop``."""
    if not steps:
        return PartPlan(part, noop=noop)
    return PartPlan(part, tuple(steps), refusal=_needs_root(state))


UnitAction = Callable[[Unit], tuple[list[str], str]]


def _unit_steps(
    part: Part, state: HostState, order: tuple[str, ...], action: UnitAction, settled: str
) -> PartPlan:
    steps = []
    for name in order:
        unit = state["units"].get(name)
        if unit is None or not unit_present(unit):
            continue
        verbs, after = action(unit)
        if verbs:
            commands = tuple(Command(("systemctl", verb, name)) for verb in verbs)
            steps.append(Step(part, f"{name}: {unit_label(unit)} → {after}", commands))
    states = ", ".join(f"{name} {unit_label(state['units'].get(name))}" for name in UNITS)
    return _changing(part, state, steps, f"{settled}: {states}")


def units_off(state: HostState, mask: bool = False) -> PartPlan:
    """Stop and disable ``ksmtuned.service`` and ``ksm.service`` (and mask them)."""
    if not state["systemd"]:
        return PartPlan(Part.UNITS_OFF, noop="systemd is not running: no KSM units to switch off")

    def action(unit: Unit) -> tuple[list[str], str]:
        verbs = [
            *(["stop"] if unit_active(unit) else []),
            *(["disable"] if unit_enabled(unit) else []),
            *(["mask"] if mask and unit["unit_file"] != "masked" else []),
        ]
        after_file = "masked" if mask else ("disabled" if unit_enabled(unit) else unit["unit_file"])
        after_active = "inactive" if unit_active(unit) else unit["active"]
        return verbs, f"{after_file}/{after_active}"

    return _unit_steps(Part.UNITS_OFF, state, UNITS, action, "KSM units are off")


def units_on(state: HostState) -> PartPlan:
    """Unmask, enable and start the units where installed (``ksm.service`` first)."""
    if not state["systemd"]:
        return PartPlan(Part.UNITS_ON, noop="systemd is not running: no KSM units to switch on")

    def action(unit: Unit) -> tuple[list[str], str]:
        masked = unit["unit_file"] == "masked"
        verbs = [
            *(["unmask"] if masked else []),
            *(["enable"] if masked or not unit_enabled(unit) else []),
            *(["start"] if not unit_active(unit) else []),
        ]
        return verbs, "enabled/active"

    # ksmtuned requires ksm.service on Debian: bring that one up first.
    return _unit_steps(
        Part.UNITS_ON, state, UNITS[::-1], action, "KSM units are on or not installed"
    )


def merging_stopped(state: HostState) -> PartPlan:
    """
    Write ``run=0`` when ``run`` has the MERGE bit (1, or 5 while memory goes offline): ksmd
    stops; merged pages stay merged. With the offline bit the kernel's run_store() waits for the
    memory offlining to end before it takes the write.
    """
    ksm = state["ksm"]
    if ksm is None:
        return PartPlan(Part.MERGING, noop=f"kernel has no KSM ({KSM_DIR} is absent)")
    if not merging(ksm):
        return PartPlan(Part.MERGING, noop=f"KSM merging is stopped (run={ksm['run']})")
    waits = " (memory is going offline: the write waits until that ends)" if offlining(ksm) else ""
    step = Step(
        Part.MERGING,
        f"run: {ksm['run']} → 0{waits}",
        (Command(("echo", "0"), stdout_to=RUN_PATH),),
    )
    return _changing(Part.MERGING, state, [step], "")


def boot_persisted(state: HostState, present: bool = True) -> PartPlan:
    """Keep ``run=0`` at boot with a systemd-tmpfiles entry, or remove that entry."""
    if not state["systemd"]:
        return PartPlan(
            Part.PERSIST, noop="systemd is not running: boot persistence is not managed"
        )
    if present and state["ksm"] is None:
        return PartPlan(
            Part.PERSIST, noop=f"kernel has no KSM ({KSM_DIR} is absent): nothing to persist"
        )
    wanted = "present" if present else "absent"
    if state["persist"] == wanted:
        return PartPlan(Part.PERSIST, noop=f"boot persistence file {PERSIST_PATH} is {wanted}")
    commands: tuple[Command, ...]
    if present:
        commands = (
            Command(("mkdir", "-p", "/etc/tmpfiles.d")),
            Command(("printf", "%s\\n", PERSIST_LINE), stdout_to=PERSIST_PATH),
        )
    else:
        commands = (Command(("rm", "-f", PERSIST_PATH)),)
    step = Step(Part.PERSIST, f"{PERSIST_PATH}: {state['persist']} → {wanted}", commands)
    return _changing(Part.PERSIST, state, [step], "")


def watch_config(options: Options) -> WatchConfig:
    """The drift watch a host's options ask for."""
    return WatchConfig(
        options.watch_host, options.watch_interval, options.watch_heal, options.watch_textfile_dir
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def watch_installed(state: HostState, present: bool | None, config: WatchConfig) -> PartPlan:
    """
    Install the drift watch (its script, service and timer; timer enabled, a first run now), or
    remove it with its state and metrics files. ``present=None``: leave it as it is.
    """
    watch = state.get("watch")
    files = watch["files"] if watch else {}
    if present is None:
        said = "installed" if files else "not installed"
        return PartPlan(Part.WATCH, noop=f"drift watch not asked for (--watch); it is {said}")
    if not state["systemd"]:
        return PartPlan(Part.WATCH, noop="systemd is not running: the drift watch needs its timer")
    if not present:
        textfile = watch["textfile"] if watch else None
        if not files:
            return PartPlan(Part.WATCH, noop="drift watch is not installed")
        commands = [
            *([Command(("systemctl", "disable", "--now", TIMER))] if TIMER_PATH in files else []),
            # A run in progress would write the metrics again after the rm: stop it first.
            *([Command(("systemctl", "stop", SERVICE))] if SERVICE_PATH in files else []),
            Command(("rm", "-f", *FILES, STATE_PATH, *([textfile] if textfile else []))),
            Command(("systemctl", "daemon-reload")),
        ]
        step = Step(Part.WATCH, "drift watch: installed → absent", tuple(commands))
        return _changing(Part.WATCH, state, [step], "")
    wanted = watch_files(config)
    stale = [path for path, text in wanted.items() if files.get(path) != _sha256(text)]
    if not stale:
        return PartPlan(Part.WATCH, noop=f"drift watch is installed ({config.describe()})")
    writes = [Command(("printf", "%s", wanted[path]), stdout_to=path) for path in stale]
    if SCRIPT_PATH in stale:
        writes.append(Command(("chmod", "0755", SCRIPT_PATH)))
    before = "absent" if not files else f"outdated ({', '.join(stale)})"
    step = Step(
        Part.WATCH,
        f"drift watch: {before} → installed ({config.describe()})",
        (
            *writes,
            Command(("systemctl", "daemon-reload")),
            Command(("systemctl", "enable", TIMER)),
            Command(("systemctl", "restart", TIMER)),
            Command(("systemctl", "start", SERVICE)),
        ),
    )
    return _changing(Part.WATCH, state, [step], "")


def unmerge_refusal(state: HostState, max_fraction: float) -> Refusal | None:
    """The memory preflight: refuse when the unmerge needs more than its share of MemAvailable."""
    need, available = unmerge_need_bytes(state), state["mem_available"]
    allowed = unmerge_allowed_bytes(state, max_fraction)
    if need <= allowed:
        return None
    return Refusal(
        RefusalCode.UNSAFE_UNMERGE,
        f"unsafe unmerge refused: needs {human_bytes(need)} ({need} bytes), more than "
        f"{max_fraction * 100:g}% of MemAvailable {human_bytes(available)} ({available} bytes); "
        "free memory, raise the limit (--max-fraction) or force it (--force)",
        {
            "need_bytes": need,
            "mem_available_bytes": available,
            "allowed_bytes": allowed,
            "max_fraction": max_fraction,
        },
    )


def unmerged(state: HostState, max_fraction: float, force: bool = False) -> PartPlan:
    """Unmerge every merged page (``run=2``) when the memory preflight passes."""
    ksm = state["ksm"]
    if ksm is None:
        return PartPlan(Part.UNMERGE, noop=f"kernel has no KSM ({KSM_DIR} is absent)")
    if not merged_page_count(ksm):
        return PartPlan(
            Part.UNMERGE,
            noop=f"no merged pages (pages_shared=0, pages_sharing=0, run={ksm['run']})",
        )
    need, available = unmerge_need_bytes(state), state["mem_available"]
    pages = counter(ksm, "pages_sharing") + counter(ksm, "ksm_zero_pages")
    step = Step(
        Part.UNMERGE,
        f"pages_sharing: {counter(ksm, 'pages_sharing')} → 0 "
        f"(~{human_bytes(need)} to unmerge, {human_bytes(available)} available)",
        (Command(("sh", "-c", UNMERGE_SCRIPT, "ksm-guard", KSM_DIR)),),
        {"pages": pages, "bytes": need, "page_size": state["page_size"]},
    )
    part = _changing(Part.UNMERGE, state, [step], "")
    if part.refusal is None and not force:
        return PartPlan(Part.UNMERGE, part.steps, refusal=unmerge_refusal(state, max_fraction))
    return part


def _vm_label(vmid: str, name: str | None) -> str:
    return f"VM {vmid} ({name})" if name else f"VM {vmid}"


def vms_opted_out(state: HostState, vmids: tuple[int, ...] = ()) -> PartPlan:
    """
    Proxmox VE 9: ``qm set <vmid> --allow-ksm 0`` on the VMs (all, or ``vmids``). A locked VM
    (config ``lock:``) is left as it is and named in the last step's line; when every VM to opt
    out is locked, the part is refused (``vm-locked``): a refusal stops the whole host's plan, so
    it is kept for when nothing else could change.
    """
    version = state["qemu_server"]
    if version is None:
        return PartPlan(
            Part.VM_OPTOUT,
            refusal=Refusal(
                RefusalCode.NOT_PROXMOX,
                "vm-optout not supported: not a Proxmox VE host (qemu-server is not installed); "
                + _HOST_WIDE,
            ),
        )
    if not allow_ksm_supported(version):
        needed = ".".join(str(part) for part in ALLOW_KSM_SINCE)
        return PartPlan(
            Part.VM_OPTOUT,
            refusal=Refusal(
                RefusalCode.NO_ALLOW_KSM,
                f"vm-optout not supported: qemu-server {version} has no allow-ksm (needs "
                f"{needed} or later, Proxmox VE 9); {_HOST_WIDE}",
            ),
        )
    # /etc/pve is not readable by others: without root the VMs would look absent.
    root = _needs_root(state)
    if root is not None:
        return PartPlan(Part.VM_OPTOUT, refusal=root)

    configs = state["pve_configs"]
    asked = [str(vmid) for vmid in vmids]
    wanted = [vmid for vmid in asked if vmid in configs] if asked else list(configs)
    elsewhere = [vmid for vmid in asked if vmid not in configs]
    not_here = f"; not configured here: VMID {', '.join(elsewhere)}" if elsewhere else ""
    if not wanted:
        return PartPlan(
            Part.VM_OPTOUT,
            noop=f"no Proxmox VE VM to opt out{not_here or ' (no VM configured)'}",
        )
    running = {vm["vmid"]: vm for vm in state["vms"] if vm["vmid"]}
    restart = [vmid for vmid in wanted if vmid in running and running[vmid]["mem_merge"]]
    # qemu-server's check_lock makes qm set fail on a locked VM (a backup, migration, snapshot,
    # suspend in progress): such VMs are left as they are and named; the others still change.
    change = [vmid for vmid in wanted if configs[vmid]["allow_ksm"]]
    locked = [vmid for vmid in change if configs[vmid].get("lock")]
    held = ", ".join(f"{vmid} (lock: {configs[vmid].get('lock')})" for vmid in locked)
    steps = []
    for vmid in change:
        if vmid in locked:
            continue
        after = "; runs with KSM until a stop/start" if vmid in restart else ""
        steps.append(
            Step(
                Part.VM_OPTOUT,
                f"{_vm_label(vmid, configs[vmid]['name'])}: allow-ksm 1 → 0{after}",
                (Command(("qm", "set", vmid, "--allow-ksm", "0")),),
            )
        )
    if locked and not steps:
        return PartPlan(
            Part.VM_OPTOUT,
            refusal=Refusal(
                RefusalCode.VM_LOCKED,
                f"vm-optout refused: qm set fails on a locked VM, and every VM to opt out is "
                f"locked: VM {held}; run it again once that task has ended{not_here}",
                {"locked_vms": len(locked)},
            ),
        )
    waiting = f"; VMs needing a stop/start: {', '.join(restart)}" if restart else ""
    noop = f"allow-ksm is 0 on VM {', '.join(wanted)}{waiting}{not_here}"
    part = _changing(Part.VM_OPTOUT, state, steps, noop)
    if locked:
        last = steps[-1]
        steps[-1] = replace(last, change=f"{last.change}; left as is, locked: VM {held}")
        labels = tuple(f"VM {vmid} (lock: {configs[vmid].get('lock')})" for vmid in locked)
        part = replace(part, steps=tuple(steps), skipped=labels)
    return part


# Each mode's parts, in the order they run.
_PARTS: dict[Mode, tuple[Callable[[HostState, Options], PartPlan], ...]] = {
    Mode.AUDIT: (),
    Mode.DISABLE: (
        lambda state, options: units_off(state, options.mask),
        lambda state, options: merging_stopped(state),
        lambda state, options: boot_persisted(state, present=True),
    ),
    Mode.ENABLE: (
        lambda state, options: units_on(state),
        lambda state, options: boot_persisted(state, present=False),
        lambda state, options: watch_installed(state, False, watch_config(options)),
    ),
    Mode.VM_OPTOUT: (lambda state, options: vms_opted_out(state, options.vmids),),
}
_PARTS[Mode.UNMERGE] = (
    *_PARTS[Mode.DISABLE],
    lambda state, options: unmerged(state, options.max_fraction, options.force),
)


def _watch_asked(state: HostState, options: Options) -> PartPlan:
    return watch_installed(state, True if options.watch else None, watch_config(options))


# The watch goes last: its first run then reports the host as the mode left it.
_PARTS[Mode.DISABLE] = (*_PARTS[Mode.DISABLE], _watch_asked)
_PARTS[Mode.UNMERGE] = (*_PARTS[Mode.UNMERGE], _watch_asked)


def plan(state: HostState, mode: Mode, options: Options, today: date | None = None) -> HostPlan:
    """
    The plan of ``mode`` for a host in ``state``. A refusal of any part refuses the whole host:
    nothing runs on it, not even the parts that would pass (an unsafe unmerge leaves the units
    and ``run`` as they are; ``disable`` is the way to stop merging without unmerging). A host
    under a waiver that holds ``today`` (UTC) is waived: no changing mode touches it, unless
    ``options.ignore_waivers``.
    """
    waiver = options.waiver
    changing = mode is not Mode.AUDIT and not options.ignore_waivers
    if changing and waiver is not None and waiver.active(today or utc_today()):
        return HostPlan(mode, options, waived=True)
    parts = tuple(build(state, options) for build in _PARTS[mode])
    refusal = next((part.refusal for part in parts if part.refusal is not None), None)
    return HostPlan(mode, options, parts, refusal)


def refused(mode: Mode, options: Options, code: RefusalCode, reason: str) -> HostPlan:
    """A plan that refuses the host before its state matters (e.g. bad settings)."""
    return HostPlan(mode, options, refusal=Refusal(code, reason))
