"""
What switching KSM off costs each host and the cluster, and which VMs to move first.

Pure: no pyinfra, no I/O. ``plan_capacity(hosts, min_headroom)`` takes each host's audit (a live
read or a saved ``ksm-guard audit -o json``) and says, per host, whether its unmerge passes the
very preflight ``unmerge`` applies (``plan.unmerge_refusal``) and leaves enough memory available;
for hosts that fail, which VMs to move where so that every host ends safe, or how much RAM the
fleet lacks.

The model. After KSM is off and unmerged, a host uses ``MemTotal - MemAvailable + need``, need
being the unmerge need ``(pages_sharing + ksm_zero_pages) x page size``. A VM occupies its
resident memory (``rss_bytes``: KSM pages count in every sharer's RSS, so RSS is what it uses
unmerged), or its configured memory when RSS is unknown. Moves are meant to happen once merging
is stopped everywhere (``disable``) and before ``unmerge``:

* Moving VMs onto a host takes their size from its MemAvailable; its need stays.
* Moving VMs off a host frees their size, less what stays shared by the VMs left behind. Each of
  their merged pages either drops out of the need (another process still maps the KSM page) or
  frees a page (they were its last mappers): need and freed memory trade one for one. The need
  falls by their KSM zero pages, and by their merged pages beyond the host's KSM pages
  (``pages_shared``, the most pages they can have been the last mappers of); that is the least
  it can fall, which is the preflight's worst case. MemAvailable rises by their size less that
  fall. Either way, what is left after the unmerge is ``MemAvailable - need + size``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from .model import HostState
from .plan import RefusalCode, unmerge_refusal
from .report import human_bytes

DEFAULT_MIN_HEADROOM = 0.10


class CapacityInputError(ValueError):
    """An audit document the plan cannot read: one line naming the host and the field."""


class Outcome(StrEnum):
    """What the fleet needs before KSM can be switched off everywhere."""

    SAFE = "safe"  # every host unmerges safely as it is
    MOVES = "moves-needed"  # the proposed moves make every host safe
    IMPOSSIBLE = "impossible"  # some host stays unsafe: the fleet lacks RAM


@dataclass(frozen=True)
class VmLoad:
    """One running VM as the plan weighs it."""

    pid: int
    vmid: str | None
    name: str | None
    rss_bytes: int | None
    configured_bytes: int | None
    merged_bytes: int  # its pages mapped to KSM pages; 0 when unknown
    zero_bytes: int  # its pages mapped to the KSM zero page; 0 when unknown

    @property
    def size_bytes(self) -> int | None:
        """What it occupies unmerged: its RSS, else its configured memory (None: unknown)."""
        return self.rss_bytes if self.rss_bytes is not None else self.configured_bytes

    @property
    def size_source(self) -> str | None:
        """Where the size comes from: ``rss``, ``configured`` or None (unknown: never moved)."""
        if self.rss_bytes is not None:
            return "rss"
        return None if self.configured_bytes is None else "configured"

    @property
    def label(self) -> str:
        """``VM 101 (db1)``, or ``pid 4242 (name)`` for a QEMU process without a VMID."""
        what = f"VM {self.vmid}" if self.vmid else f"pid {self.pid}"
        return f"{what} ({self.name})" if self.name else what

    def order(self) -> tuple[int, int]:
        """Ties broken by VMID, then pid."""
        return (int(self.vmid) if self.vmid and self.vmid.isdigit() else 0, self.pid)


@dataclass(frozen=True)
class HostLoad:
    """One readable host's memory and VMs, from its audit."""

    host: str
    mem_total: int
    mem_available: int
    need: int
    shared_bytes: int  # pages_shared x page size: KSM pages
    page_size: int
    max_fraction: float
    vms: tuple[VmLoad, ...] = ()
    blocked: str | None = None  # unmerge refuses the host whatever its memory (bad settings)
    node: str | None = None  # its Proxmox VE node name, from its own hostname; None: unknown

    @property
    def node_name(self) -> str:
        """The node name ``qm migrate`` wants: the host's own, else its inventory name."""
        return self.node or self.host


@dataclass(frozen=True)
class HostInput:
    """A host of the fleet: its audit, or why it could not be read (``audit`` None)."""

    host: str
    audit: Mapping[str, object] | None
    detail: str | None = None
    blocked: str | None = None


@dataclass(frozen=True)
class Memory:
    """A host's MemAvailable and unmerge need at one point of the plan."""

    available: int
    need: int

    @property
    def left(self) -> int:
        """MemAvailable once unmerged."""
        return self.available - self.need


@dataclass(frozen=True)
class Move:
    """One VM to move before the unmerge; the node names are the hosts' own when known."""

    vm: VmLoad
    source: str
    target: str
    source_node: str | None = None
    target_node: str | None = None

    @property
    def size_bytes(self) -> int:
        return self.vm.size_bytes or 0

    @property
    def command(self) -> str | None:
        """
        ``qm migrate 102 pve-c --online``, to run on the source node: for a Proxmox VE VM (one
        with a VMID), naming the target by its node name, else by its inventory name. Nothing
        runs it.
        """
        if not self.vm.vmid:
            return None
        return shlex.join(
            ["qm", "migrate", self.vm.vmid, self.target_node or self.target, "--online"]
        )


@dataclass(frozen=True)
class HostCapacity:
    """One host's figures now and after the proposed moves."""

    load: HostLoad
    now: Memory
    after: Memory
    reasons_now: tuple[str, ...]
    reasons_after: tuple[str, ...]
    moved_out: int
    moved_in: int
    missing: int | None  # RAM the host still lacks after the moves; None: not a memory matter

    @property
    def host(self) -> str:
        return self.load.host

    @property
    def safe_now(self) -> bool:
        return not self.reasons_now

    @property
    def safe_after(self) -> bool:
        return not self.reasons_after

    @property
    def allowed(self) -> int:
        """The most the unmerge may need now: ``max_fraction`` of MemAvailable."""
        return int(self.now.available * self.load.max_fraction)

    @property
    def vm_configured(self) -> int:
        """The configured memory of the VMs that report it."""
        return sum(vm.configured_bytes or 0 for vm in self.load.vms)

    @property
    def vm_configured_unknown(self) -> int:
        """How many VMs do not report their configured memory."""
        return sum(vm.configured_bytes is None for vm in self.load.vms)

    @property
    def overcommit(self) -> float | None:
        """Configured VM memory over RAM (of the VMs that report it; None: none does)."""
        if self.load.vms and self.vm_configured_unknown == len(self.load.vms):
            return None
        return self.vm_configured / self.load.mem_total


@dataclass(frozen=True)
class CapacityPlan:
    """The fleet's plan: every readable host, the moves, the hosts that could not be read."""

    min_headroom: float
    hosts: tuple[HostCapacity, ...]
    moves: tuple[Move, ...]
    unread: tuple[HostInput, ...] = field(default=())
    order: tuple[str, ...] = field(default=())  # every host, in the order given

    def in_order(self) -> list[HostCapacity | HostInput]:
        """Every host as given: its figures, or the input of a host that could not be read."""
        found: dict[str, HostCapacity | HostInput] = {host.host: host for host in self.unread}
        found.update({host.host: host for host in self.hosts})
        return [found[name] for name in self.order]

    @property
    def outcome(self) -> Outcome:
        if any(not host.safe_after for host in self.hosts):
            return Outcome.IMPOSSIBLE
        return Outcome.MOVES if self.moves else Outcome.SAFE

    @property
    def missing(self) -> int:
        """RAM the fleet lacks after the moves, summed over the hosts still unsafe."""
        return sum(host.missing or 0 for host in self.hosts)


# -- the model ------------------------------------------------------------------------------


def after_moves(load: HostLoad, out: Sequence[VmLoad], into: Sequence[VmLoad]) -> Memory:
    """The host's MemAvailable and unmerge need once ``out`` left it and ``into`` arrived."""
    merged = sum(vm.merged_bytes for vm in out)
    fall = min(load.need, sum(vm.zero_bytes for vm in out) + max(0, merged - load.shared_bytes))
    size_out = sum(vm.size_bytes or 0 for vm in out)
    size_in = sum(vm.size_bytes or 0 for vm in into)
    return Memory(load.mem_available + size_out - fall - size_in, load.need - fall)


def synthetic_state(load: HostLoad, memory: Memory) -> HostState:
    """A host state with this memory, for the preflight ``unmerge`` applies."""
    pages = -(-memory.need // load.page_size)
    return {
        "uid": 0,
        "page_size": load.page_size,
        "mem_total": load.mem_total,
        "mem_available": memory.available,
        "ksm": {"run": 0, "pages_sharing": pages, "ksm_zero_pages": 0},
        "systemd": False,
        "units": {},
        "persist": "absent",
        "qemu_server": None,
        "vms": [],
        "pve_configs": {},
    }


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def memory_reasons(load: HostLoad, memory: Memory, min_headroom: float) -> tuple[str, ...]:
    """Why the host would not be safe with this memory (none: safe)."""
    reasons = []
    if unmerge_refusal(synthetic_state(load, memory), load.max_fraction) is not None:
        reasons.append(
            f"unmerge refused: needs {human_bytes(memory.need)}, more than "
            f"{load.max_fraction * 100:g}% of MemAvailable {human_bytes(memory.available)}"
        )
    if memory.left < min_headroom * load.mem_total:
        reasons.append(
            f"{human_bytes(memory.left)} ({_percent(memory.left / load.mem_total)} of RAM) "
            f"available after unmerge, below {min_headroom * 100:g}%"
        )
    return tuple(reasons)


def unsafe_reasons(load: HostLoad, memory: Memory, min_headroom: float) -> tuple[str, ...]:
    """Why the host would not be safe: its settings block the unmerge, or its memory falls short."""
    blocked = (load.blocked,) if load.blocked else ()
    return blocked + memory_reasons(load, memory, min_headroom)


def _least(fits: Callable[[int], bool]) -> int:
    """The least ``x >= 0`` for which ``fits(x)`` holds, ``fits`` being monotone."""
    if fits(0):
        return 0
    low, high = 0, 1
    while not fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def missing_bytes(load: HostLoad, memory: Memory, min_headroom: float) -> int:
    """The least MemAvailable the host must gain to be safe."""
    return _least(
        lambda extra: (
            not memory_reasons(load, Memory(memory.available + extra, memory.need), min_headroom)
        )
    )


def room_bytes(load: HostLoad, memory: Memory, min_headroom: float) -> int:
    """The most VM memory the host can take in and stay safe (-1: it is not safe now)."""
    if memory_reasons(load, memory, min_headroom):
        return -1
    # Taking in more than MemAvailable leaves less than nothing: never safe.
    overflow = _least(
        lambda taken: bool(
            memory_reasons(load, Memory(memory.available - taken, memory.need), min_headroom)
        )
    )
    return overflow - 1


# -- the moves ------------------------------------------------------------------------------


class _Fleet:
    """The hosts while moves are tried: who sends which VMs, who takes them in."""

    def __init__(self, loads: Sequence[HostLoad], min_headroom: float) -> None:
        self.loads = {load.host: load for load in loads}
        self.min_headroom = min_headroom
        self.out: dict[str, list[VmLoad]] = {load.host: [] for load in loads}
        self.into: dict[str, list[VmLoad]] = {load.host: [] for load in loads}
        self.moves: list[Move] = []
        self.room: dict[str, int] = {}

    def memory(self, host: str, leaving: Sequence[VmLoad] = ()) -> Memory:
        return after_moves(self.loads[host], [*self.out[host], *leaving], self.into[host])

    def reasons(self, host: str, leaving: Sequence[VmLoad] = ()) -> tuple[str, ...]:
        return unsafe_reasons(self.loads[host], self.memory(host, leaving), self.min_headroom)

    def rooms(self, targets: Sequence[str]) -> list[tuple[int, str]]:
        """Each target's room, least first (kept until a move changes that target)."""
        for name in targets:
            if name not in self.room:
                load = self.loads[name]
                self.room[name] = room_bytes(load, self.memory(name), self.min_headroom)
        return sorted((self.room[name], name) for name in targets)

    def move(self, vm: VmLoad, source: str, target: str) -> None:
        self.out[source].append(vm)
        self.into[target].append(vm)
        self.moves.append(
            Move(vm, source, target, self.loads[source].node, self.loads[target].node)
        )
        self.room.pop(target, None)

    def undo(self, source: str) -> None:
        """Take back every move off ``source``."""
        for move in [move for move in self.moves if move.source == source]:
            self.out[source].remove(move.vm)
            self.into[move.target].remove(move.vm)
            self.moves.remove(move)
            self.room.pop(move.target, None)

    def relieve(self, source: str, targets: Sequence[str]) -> bool:
        """
        Move VMs off ``source`` until it is safe: whenever one VM that fits somewhere would
        finish the job, the smallest such VM; otherwise the largest VM that fits somewhere.
        Fewest VMs first, then fewest bytes. True when the source ends safe.
        """
        while self.reasons(source):
            rooms = self.rooms(targets)
            options = [
                (vm, fit[0])
                for vm in self.loads[source].vms
                if vm.size_bytes is not None
                and vm not in self.out[source]
                # best fit: the target left with the least room that still takes the VM
                and (fit := [name for room, name in rooms if room >= (vm.size_bytes or 0)])
            ]
            if not options:
                return False
            finishing = [option for option in options if not self.reasons(source, [option[0]])]
            if finishing:
                vm, target = min(finishing, key=lambda o: (o[0].size_bytes or 0, o[0].order()))
            else:
                vm, target = min(options, key=lambda o: (-(o[0].size_bytes or 0), o[0].order()))
            self.move(vm, source, target)
        return True


def plan_capacity(
    hosts: Sequence[HostInput],
    min_headroom: float = DEFAULT_MIN_HEADROOM,
    max_fraction: float | None = None,
) -> CapacityPlan:
    """
    Each host's figures, and the moves that make every host safe.

    Hosts safe as they are take VMs in; each other host, the one lacking the most RAM first,
    sends VMs off (``_Fleet.relieve``) to the target that fits each one most tightly. A host that
    cannot be made safe keeps none of its moves while the others are planned; then it moves what
    still fits, largest first, and the RAM it lacks after that is reported. ``max_fraction``
    overrides every host's own (unmerge's ``--max-fraction``).
    """
    loads = []
    for host in hosts:
        if host.audit is not None:
            load = host_load(host.host, host.audit, host.blocked)
            if max_fraction is not None:
                load = replace(load, max_fraction=max_fraction)
            loads.append(load)
    fleet = _Fleet(loads, min_headroom)
    targets = [load.host for load in loads if not fleet.reasons(load.host)]
    sources = [load for load in loads if fleet.reasons(load.host) and not load.blocked]
    sources.sort(key=lambda load: -missing_bytes(load, fleet.memory(load.host), min_headroom))
    failed = []
    for load in sources:
        if not fleet.relieve(load.host, targets):
            fleet.undo(load.host)
            failed.append(load.host)
    for name in failed:
        fleet.relieve(name, targets)

    figures = []
    for load in loads:
        now = after_moves(load, (), ())
        after = fleet.memory(load.host)
        reasons_after = fleet.reasons(load.host)
        figures.append(
            HostCapacity(
                load=load,
                now=now,
                after=after,
                reasons_now=unsafe_reasons(load, now, min_headroom),
                reasons_after=reasons_after,
                moved_out=sum(vm.size_bytes or 0 for vm in fleet.out[load.host]),
                moved_in=sum(vm.size_bytes or 0 for vm in fleet.into[load.host]),
                missing=None
                if load.blocked
                else (missing_bytes(load, after, min_headroom) if reasons_after else 0),
            )
        )
    unread = tuple(host for host in hosts if host.audit is None)
    order = tuple(host.host for host in hosts)
    return CapacityPlan(min_headroom, tuple(figures), tuple(fleet.moves), unread, order)


# -- reading audits -------------------------------------------------------------------------


def _number(
    record: Mapping[str, object], key: str, where: str, *, optional: bool = False
) -> int | None:
    """A byte count or a count of ``record``: a non-negative integer (or None when optional)."""
    value = record.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shape = "a non-negative integer or null" if optional else "a non-negative integer"
        raise CapacityInputError(f"{where}.{key} must be {shape}, not {value!r}")
    return value


def _required(record: Mapping[str, object], key: str, where: str) -> int:
    value = _number(record, key, where)
    assert value is not None
    return value


def _text(record: Mapping[str, object], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise CapacityInputError(f"{where}.{key} must be a string or null, not {value!r}")
    return value


def node_name(audit: Mapping[str, object]) -> str | None:
    """
    The host's Proxmox VE node name: its own hostname (``evidence.hostname``, read when the audit
    has it) up to the first dot, as Proxmox VE names nodes. None when absent or not a name.
    """
    evidence = audit.get("evidence")
    hostname = evidence.get("hostname") if isinstance(evidence, Mapping) else None
    if not isinstance(hostname, str):
        return None
    return hostname.strip().split(".")[0] or None


def vm_load(vm: Mapping[str, object], page_size: int, where: str) -> VmLoad:
    """One entry of an audit's ``vms``; ``rss_bytes`` and ``configured_bytes`` may be absent."""
    zero_pages = _number(vm, "ksm_zero_pages", where, optional=True)
    return VmLoad(
        pid=_required(vm, "pid", where),
        vmid=_text(vm, "vmid", where),
        name=_text(vm, "name", where),
        rss_bytes=_number(vm, "rss_bytes", where, optional=True),
        configured_bytes=_number(vm, "configured_bytes", where, optional=True),
        merged_bytes=_number(vm, "merged_bytes", where, optional=True) or 0,
        zero_bytes=(zero_pages or 0) * page_size,
    )


def host_load(
    host: str, audit: Mapping[str, object], blocked: str | None = None, where: str = "audit"
) -> HostLoad:
    """A host's load from its audit record (``operations.report.audit_record``)."""
    mem_total = _required(audit, "mem_total_bytes", where)
    page_size = _required(audit, "page_size", where)
    fraction = audit.get("unmerge_max_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise CapacityInputError(
            f"{where}.unmerge_max_fraction must be a number in (0, 1], not {fraction!r}"
        )
    if not mem_total or not page_size:
        raise CapacityInputError(f"{where}: mem_total_bytes and page_size must not be 0")
    vms = audit.get("vms", [])
    if not isinstance(vms, list) or not all(isinstance(vm, Mapping) for vm in vms):
        raise CapacityInputError(f"{where}.vms must be a list of objects")
    return HostLoad(
        host=host,
        mem_total=mem_total,
        mem_available=_required(audit, "mem_available_bytes", where),
        need=_required(audit, "unmerge_need_bytes", where),
        shared_bytes=_required(audit, "pages_shared", where) * page_size,
        page_size=page_size,
        max_fraction=float(fraction),
        vms=tuple(vm_load(vm, page_size, f"{where}.vms[{index}]") for index, vm in enumerate(vms)),
        blocked=blocked,
        node=node_name(audit),
    )


def hosts_from_document(document: object) -> list[HostInput]:
    """
    The hosts of a saved ``ksm-guard ... -o json`` document (anything with ``hosts[].host`` and
    ``hosts[].audit``). Every audit is checked here: a bad one names its host and field.
    """
    hosts = document.get("hosts") if isinstance(document, dict) else None
    if not isinstance(hosts, list) or not hosts:
        raise CapacityInputError("not a ksm-guard result: no hosts list with at least one host")
    found: list[HostInput] = []
    for index, entry in enumerate(hosts):
        where = f"hosts[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("host"), str):
            raise CapacityInputError(f"{where} must be an object with a host name")
        name = entry["host"]
        if any(host.host == name for host in found):
            raise CapacityInputError(f"{where}: host {name!r} is listed twice")
        where = f"{where} ({name})"
        audit = entry.get("audit")
        if audit is not None and not isinstance(audit, dict):
            raise CapacityInputError(f"{where}.audit must be an object or null")
        refusal = entry.get("refusal")
        blocked = None
        if isinstance(refusal, dict) and refusal.get("code") == RefusalCode.BAD_SETTINGS:
            blocked = str(refusal.get("reason") or "bad ksm-guard settings")
        detail = _text(entry, "detail", where)
        if audit is None:
            verdict = _text(entry, "verdict", where)
            reason = ": ".join(part for part in (verdict, detail) if part) or "no audit"
            found.append(HostInput(name, None, reason))
            continue
        host_load(name, audit, blocked, f"{where}.audit")  # checked now: one line, exit 2
        found.append(HostInput(name, audit, detail, blocked))
    return found
