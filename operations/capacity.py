"""
What switching KSM off costs each host and the cluster, and which VMs to move first.

Pure: no pyinfra, no I/O. ``plan_capacity(hosts, min_headroom)`` takes each host's audit (a live
read or a saved ``ksm-guard audit -o json``) and says, per host, whether its unmerge passes the
very preflight ``unmerge`` applies (``plan.unmerge_refusal``) and leaves enough memory available;
for hosts that fail, which VMs to move where so that every host ends safe, moving the fewest
bytes (searched exhaustively when few VMs weigh, a greedy beyond), or how much RAM the pool
lacks; and whether the others could take the most loaded host's VMs if it failed (N+1). VMs
move within a pool: one per Proxmox VE cluster (the ``cluster`` of each audit, from the node's
own ``/etc/pve/.members``), a pool of one for a Proxmox VE node in no cluster, and one pool of
all the hosts whose membership is unknown (not Proxmox VE, or audits saved before ksm-guard
read it). ``safe_first`` orders hosts for ``unmerge --order plan``.

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

import math
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
    node: str | None = None  # its Proxmox VE node name (membership, else hostname); None: unknown
    node_from: str | None = None  # where ``node`` comes from: ``cluster`` or ``hostname``

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
    target_node_from: str | None = None  # ``cluster`` or ``hostname``; None: inventory name

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
class PoolKey:
    """Where a host's VMs can go: its Proxmox VE cluster, or itself alone (a node in none)."""

    cluster: str | None
    node: str | None = None  # a Proxmox VE node in no cluster: a pool of its own

    @property
    def label(self) -> str:
        if self.cluster is not None:
            return f"cluster {self.cluster}"
        return f"node {self.node} (in no cluster)"


@dataclass(frozen=True)
class Pool:
    """One pool's hosts and its own outcome: moves never leave a pool."""

    key: PoolKey | None  # None: the hosts of no known Proxmox VE cluster, as one pool
    hosts: tuple[str, ...]
    outcome: Outcome
    missing: int
    moves: int
    moved_bytes: int
    exhaustive: bool
    n_plus_1: NPlusOne | None

    @property
    def label(self) -> str:
        return self.key.label if self.key else "hosts in no known cluster"


@dataclass(frozen=True)
class CapacityPlan:
    """The fleet's plan: every readable host, the moves, the hosts that could not be read."""

    min_headroom: float
    hosts: tuple[HostCapacity, ...]
    moves: tuple[Move, ...]
    unread: tuple[HostInput, ...] = field(default=())
    order: tuple[str, ...] = field(default=())  # every host, in the order given
    exhaustive: bool = False  # the moves were searched exhaustively: fewest bytes, or none exist
    n_plus_1: NPlusOne | None = None  # the pool's when there is one pool, else see ``pools``
    pools: tuple[Pool, ...] = ()  # in the order of their first host

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

SEARCH_VMS = 40  # the search runs when the VMs it would weigh are at most this many
SEARCH_STEPS = 50_000  # and stops after this many steps: the greedy's plan, or better, stands


def _size(vm: VmLoad) -> int:
    return vm.size_bytes or 0


def _weight(vm: VmLoad) -> tuple[int, int, int]:
    """What a move of the VM changes: VMs alike in this are interchangeable."""
    return _size(vm), vm.merged_bytes, vm.zero_bytes


def movable(vms: Sequence[VmLoad]) -> tuple[VmLoad, ...]:
    """The VMs that can move (their size is known), largest first; alike VMs next to each other."""
    known = [vm for vm in vms if vm.size_bytes is not None]
    return tuple(sorted(known, key=lambda vm: (tuple(-part for part in _weight(vm)), vm.order())))


@dataclass(frozen=True)
class _Source:
    """A host that sends VMs off: the VMs it can move, largest first, and when it is done."""

    host: str
    vms: tuple[VmLoad, ...]
    done: Callable[[Sequence[VmLoad]], bool]  # done once these VMs have left
    short: Callable[[Sequence[VmLoad], Sequence[VmLoad]], int]  # (gone, may go): least to go


def _unsafe_source(load: HostLoad, min_headroom: float) -> _Source:
    """A host unsafe as it is, done when safe (whether it is depends only on what left)."""
    floor = min_headroom * load.mem_total
    now = after_moves(load, (), ())
    known: dict[frozenset[int], bool] = {}

    def done(gone: Sequence[VmLoad]) -> bool:
        key = frozenset(id(vm) for vm in gone)
        if key not in known:
            after = after_moves(load, gone, ())
            known[key] = not unsafe_reasons(load, after, min_headroom)
        return known[key]

    def short(gone: Sequence[VmLoad], rest: Sequence[VmLoad]) -> int:
        """
        The least VM memory that must still leave, whichever of ``rest`` go. What is left after
        the unmerge rises by exactly the size moved: the headroom lacking must leave. The
        preflight wants ``need - fall <= f x (available + size - fall)``, ``fall`` the need's
        fall, at most that of all of ``gone`` and ``rest`` leaving: so size must reach at least
        ``need / f - available - fall x (1 / f - 1)``.
        """
        size = sum(_size(vm) for vm in gone)
        headroom = floor - now.left - size
        fall = load.need - after_moves(load, [*gone, *rest], ()).need
        fraction = load.max_fraction
        preflight = load.need / fraction - now.available - size - fall * (1 / fraction - 1)
        return max(0, math.floor(max(headroom, preflight)) - 1)  # 1: float rounding

    return _Source(load.host, movable(load.vms), done, short)


def _emptied(host: str, vms: Sequence[VmLoad]) -> _Source:
    """A failed host: done when all its VMs (of known size) found a place."""
    known = movable(vms)
    total = sum(_size(vm) for vm in known)
    return _Source(
        host,
        known,
        lambda gone: len(gone) == len(known),
        lambda gone, rest: total - sum(_size(vm) for vm in gone),
    )


class _Moves:
    """Moves being tried: the VMs each source sends off, each target's room left."""

    def __init__(self, rooms: Mapping[str, int]) -> None:
        self.room = dict(rooms)
        self.out: dict[str, list[VmLoad]] = {}
        self.moves: list[tuple[VmLoad, str, str]] = []  # (vm, source, target), in order

    def gone(self, source: str) -> list[VmLoad]:
        return self.out.setdefault(source, [])

    def move(self, vm: VmLoad, source: str, target: str) -> None:
        self.gone(source).append(vm)
        self.room[target] -= _size(vm)
        self.moves.append((vm, source, target))

    def undo(self, source: str) -> None:
        """Take back every move off ``source``."""
        for vm, _, target in [move for move in self.moves if move[1] == source]:
            self.room[target] += _size(vm)
        self.moves = [move for move in self.moves if move[1] != source]
        self.out[source] = []

    @property
    def cost(self) -> tuple[int, int]:
        """Bytes moved, then moves."""
        return sum(_size(vm) for vm, _, _ in self.moves), len(self.moves)

    @classmethod
    def replay(cls, rooms: Mapping[str, int], moves: Sequence[tuple[VmLoad, str, str]]) -> _Moves:
        again = cls(rooms)
        for vm, source, target in moves:
            again.move(vm, source, target)
        return again


def _relieve(source: _Source, moves: _Moves) -> bool:
    """
    Move VMs off ``source`` until it is done: whenever one VM that fits somewhere would finish
    the job, the smallest such VM; otherwise the largest VM that fits somewhere. Each goes to
    the target left with the least room that takes it (best fit). True when the source is done.
    """
    gone = moves.gone(source.host)
    while not source.done(gone):
        rooms = sorted((room, name) for name, room in moves.room.items())
        options = [
            (vm, fit[0])
            for vm in source.vms
            if vm not in gone and (fit := [name for room, name in rooms if room >= _size(vm)])
        ]
        if not options:
            return False
        finishing = [option for option in options if source.done([*gone, option[0]])]
        if finishing:
            vm, target = min(finishing, key=lambda o: (_size(o[0]), o[0].order()))
        else:
            vm, target = min(options, key=lambda o: (-_size(o[0]), o[0].order()))
        moves.move(vm, source.host, target)
    return True


def _greedy(sources: Sequence[_Source], rooms: Mapping[str, int]) -> tuple[_Moves, bool]:
    """
    Each source in turn relieved (``_relieve``). A source that cannot be done keeps none of its
    moves while the others are planned; then it moves what still fits. True: all are done.
    """
    moves = _Moves(rooms)
    failed = []
    for source in sources:
        if not _relieve(source, moves):
            moves.undo(source.host)
            failed.append(source)
    for source in failed:
        _relieve(source, moves)
    return moves, not failed


class _OutOfSteps(Exception):
    """The search used up its steps."""


class _Steps:
    def __init__(self, steps: int) -> None:
        self.left = steps

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _OutOfSteps


Placement = list[tuple[VmLoad, str, str]]  # (vm, source, target)


def _pack(
    leaving: Sequence[tuple[VmLoad, str]], rooms: Mapping[str, int], steps: _Steps
) -> Placement | None:
    """
    A target for each VM, none given more than its room: best fit, largest first; when that
    fails, depth first over the targets (of those with the same room left, one: only their room
    matters), cut when the VMs left outweigh the room that could take any of them. None: there
    is none.
    """
    items = sorted(leaving, key=lambda item: (-_size(item[0]), item[0].order()))
    sizes = [_size(vm) for vm, _ in items]
    room = dict(rooms)
    placed: Placement = []
    for (vm, source), size in zip(items, sizes, strict=True):
        fit = [(left, name) for name, left in room.items() if left >= size]
        if not fit:
            break
        target = min(fit)[1]
        room[target] -= size
        placed.append((vm, source, target))
    else:
        return placed
    room = dict(rooms)
    placed = []
    weight_left = [sum(sizes[index:]) for index in range(len(sizes) + 1)]

    def visit(index: int) -> bool:
        steps.take()
        if index == len(items):
            return True
        usable = sum(left for left in room.values() if left >= sizes[-1])
        if weight_left[index] > usable:
            return False
        vm, source = items[index]
        tried = set()
        for left, target in sorted((left, name) for name, left in room.items()):
            if left >= sizes[index] and left not in tried:
                tried.add(left)
                room[target] -= sizes[index]
                placed.append((vm, source, target))
                if visit(index + 1):
                    return True
                placed.pop()
                room[target] += sizes[index]
        return False

    return placed if visit(0) else None


def _search(
    sources: Sequence[_Source],
    rooms: Mapping[str, int],
    bound: tuple[int, int] | None,
    steps: int,
) -> tuple[Placement | None, bool]:
    """
    The VMs to move that get every source done with the fewest bytes, then the fewest moves, if
    they beat ``bound`` (bytes, moves), with a target for each (``_pack``). Depth first over
    each source's VMs, largest first, each leaving or staying. A source once done sends nothing
    more (more only costs more); of VMs alike (``_weight``), those that leave are the first ones.
    A branch is cut when its bytes plus the least each source must
    still send (``_Source.short``) reach the best found, or when the VMs a source has left
    cannot cover that least. Returns the best placement found (None: nothing beats ``bound``)
    and whether the search finished within ``steps``: then nothing better exists, and no plan
    at all when there is neither a bound nor a find.
    """
    gone: list[list[VmLoad]] = [[] for _ in sources]
    best: list[tuple[int, int] | None] = [bound]
    found: list[Placement] = []
    counter = _Steps(steps)
    least_after = [0] * (len(sources) + 1)
    for index in reversed(range(len(sources))):
        least_after[index] = least_after[index + 1] + sources[index].short((), sources[index].vms)
    sizes_left = [
        [sum(_size(vm) for vm in source.vms[k:]) for k in range(len(source.vms) + 1)]
        for source in sources
    ]

    def visit(index: int, k: int, cost: int, count: int) -> None:
        counter.take()
        if index == len(sources):
            if best[0] is not None and (cost, count) >= best[0]:
                return
            pairs = zip(sources, gone, strict=True)
            placement = _pack(
                [(vm, source.host) for source, out in pairs for vm in out], rooms, counter
            )
            if placement is not None:
                best[0] = (cost, count)
                found.append(placement)
            return
        source = sources[index]
        if source.done(gone[index]):
            visit(index + 1, 0, cost, count)
            return
        short = source.short(gone[index], source.vms[k:])
        if k == len(source.vms) or sizes_left[index][k] < short:
            return
        if best[0] is not None and (cost + short + least_after[index + 1], count) >= best[0]:
            return
        vm = source.vms[k]
        previous = source.vms[k - 1] if k else None
        if previous is None or _weight(previous) != _weight(vm) or previous in gone[index]:
            gone[index].append(vm)
            visit(index, k + 1, cost + _size(vm), count + 1)
            gone[index].pop()
        visit(index, k + 1, cost, count)

    try:
        visit(0, 0, 0, 0)
        finished = True
    except _OutOfSteps:
        finished = False
    return (found[-1] if found else None), finished


def _place(
    sources: Sequence[_Source], rooms: Mapping[str, int], search_steps: int
) -> tuple[_Moves, bool, bool]:
    """
    The greedy's moves (``_greedy``), replaced by the search's (``_search``) when it finds
    fewer bytes or a plan where the greedy found none. The search runs when the VMs it would
    weigh are at most ``SEARCH_VMS``. Returns the moves, whether every source is done, and
    whether the search finished (the moves are then the fewest bytes there are; with sources
    not done, no moves can do them all).
    """
    moves, done = _greedy(sources, rooms)
    if not search_steps or sum(len(source.vms) for source in sources) > SEARCH_VMS:
        return moves, done, False
    found, finished = _search(sources, rooms, moves.cost if done else None, search_steps)
    if found is None:
        return moves, done, finished
    return _Moves.replay(rooms, found), True, finished


@dataclass(frozen=True)
class NPlusOne:
    """Whether the others, with KSM off, can take the VMs of the most loaded host if it fails."""

    host: str | None  # the host whose VMs weigh the most after the moves; None: no VM memory
    bytes: int  # what its VMs occupy (those of known size)
    vms: int  # how many VMs it runs
    unknown: int  # of which of unknown size: neither counted nor placed
    fits: bool
    shortfall: int  # the memory of its VMs that finds no room (0 when they fit)
    exhaustive: bool  # the packing was searched exhaustively (fits False is then proven)


def n_plus_one(
    hosts: Sequence[HostCapacity],
    running: Mapping[str, Sequence[VmLoad]],
    min_headroom: float,
    search_steps: int = SEARCH_STEPS,
) -> NPlusOne:
    """
    The most loaded host (by its VMs' memory, after the moves; the first of equals) fails: can
    the others, KSM off and unmerged, take its VMs and keep ``min_headroom`` of their RAM?
    Only hosts safe after the moves take VMs; each has ``MemAvailable - need`` after its unmerge.
    The VMs are placed like moves (best fit, largest first; searched when few); the shortfall
    is the memory of those left without a host: that much more RAM on the host with the most
    room left takes them all.
    """
    weight = {host.host: sum(_size(vm) for vm in running[host.host]) for host in hosts}
    if not hosts or not max(weight.values()):
        return NPlusOne(None, 0, 0, 0, True, 0, True)
    failed = max(hosts, key=lambda host: weight[host.host])
    vms = running[failed.host]
    rooms = {
        host.host: room_bytes(host.load, Memory(host.after.left, 0), min_headroom)
        for host in hosts
        if host is not failed and host.safe_after
    }
    source = _emptied(failed.host, vms)
    moves, fits, exhaustive = _place([source], rooms, search_steps)
    unknown = len(vms) - len(source.vms)
    shortfall = 0 if fits else weight[failed.host] - moves.cost[0]
    return NPlusOne(
        failed.host, weight[failed.host], len(vms), unknown, fits, shortfall, exhaustive
    )


def plan_capacity(
    hosts: Sequence[HostInput],
    min_headroom: float = DEFAULT_MIN_HEADROOM,
    max_fraction: float | None = None,
    search_steps: int = SEARCH_STEPS,
) -> CapacityPlan:
    """
    Each pool planned on its own (``_plan_pool``), then put together: every host's figures,
    the moves (never across pools), the hosts that could not be read, each pool's outcome and
    N+1 check. With one pool this is that pool's plan.
    """
    groups: dict[PoolKey | None, list[HostInput]] = {}
    for host in hosts:
        if host.audit is not None:
            groups.setdefault(pool_key(host.audit), []).append(host)
    if len(groups) <= 1:
        plan = _plan_pool(hosts, min_headroom, max_fraction, search_steps)
        return replace(plan, pools=tuple(_pool(key, plan) for key in groups))
    plans = [
        (key, _plan_pool(members, min_headroom, max_fraction, search_steps))
        for key, members in groups.items()
    ]
    return CapacityPlan(
        min_headroom,
        tuple(figures for _, plan in plans for figures in plan.hosts),
        tuple(move for _, plan in plans for move in plan.moves),
        tuple(host for host in hosts if host.audit is None),
        tuple(host.host for host in hosts),
        exhaustive=all(plan.exhaustive for _, plan in plans),
        pools=tuple(_pool(key, plan) for key, plan in plans),
    )


def _pool(key: PoolKey | None, plan: CapacityPlan) -> Pool:
    return Pool(
        key,
        tuple(host.host for host in plan.hosts),
        plan.outcome,
        plan.missing,
        len(plan.moves),
        sum(move.size_bytes for move in plan.moves),
        plan.exhaustive,
        plan.n_plus_1,
    )


def _plan_pool(
    hosts: Sequence[HostInput],
    min_headroom: float = DEFAULT_MIN_HEADROOM,
    max_fraction: float | None = None,
    search_steps: int = SEARCH_STEPS,
) -> CapacityPlan:
    """
    One pool's plan: each host's figures, the moves that make every host safe with the fewest
    bytes moved that the planner finds, and the N+1 check.

    Hosts safe as they are take VMs in, up to their room; each other host (the one lacking the
    most RAM first) sends VMs off. ``_place`` picks the moves: a greedy, then an exhaustive
    search when the VMs to weigh are few (``SEARCH_VMS``, ``search_steps``; 0: greedy only).
    When no plan makes every host safe, the hosts that can be are, the others move what still
    fits, and the RAM they still lack is reported. ``max_fraction`` overrides every host's own
    (unmerge's ``--max-fraction``).
    """
    loads = _loads(hosts, max_fraction)
    now = {load.host: after_moves(load, (), ()) for load in loads}
    reasons_now = {load.host: unsafe_reasons(load, now[load.host], min_headroom) for load in loads}
    rooms = {
        load.host: room_bytes(load, now[load.host], min_headroom)
        for load in loads
        if not reasons_now[load.host]
    }
    unsafe = [load for load in loads if reasons_now[load.host] and not load.blocked]
    unsafe.sort(key=lambda load: -missing_bytes(load, now[load.host], min_headroom))
    sources = [_unsafe_source(load, min_headroom) for load in unsafe]
    placed, _, exhaustive = _place(sources, rooms, search_steps)

    by_name = {load.host: load for load in loads}
    moves = tuple(
        Move(
            vm,
            source,
            target,
            by_name[source].node,
            by_name[target].node,
            by_name[target].node_from,
        )
        for vm, source, target in placed.moves
    )
    into: dict[str, list[VmLoad]] = {load.host: [] for load in loads}
    for move in moves:
        into[move.target].append(move.vm)
    figures = []
    running = {}
    for load in loads:
        out = placed.out.get(load.host, [])
        after = after_moves(load, out, into[load.host])
        reasons_after = unsafe_reasons(load, after, min_headroom)
        figures.append(
            HostCapacity(
                load=load,
                now=now[load.host],
                after=after,
                reasons_now=reasons_now[load.host],
                reasons_after=reasons_after,
                moved_out=sum(_size(vm) for vm in out),
                moved_in=sum(_size(vm) for vm in into[load.host]),
                missing=None
                if load.blocked
                else (missing_bytes(load, after, min_headroom) if reasons_after else 0),
            )
        )
        running[load.host] = [vm for vm in load.vms if vm not in out] + into[load.host]
    unread = tuple(host for host in hosts if host.audit is None)
    order = tuple(host.host for host in hosts)
    return CapacityPlan(
        min_headroom,
        tuple(figures),
        moves,
        unread,
        order,
        exhaustive=exhaustive,
        n_plus_1=n_plus_one(figures, running, min_headroom, search_steps),
    )


def _loads(hosts: Sequence[HostInput], max_fraction: float | None) -> list[HostLoad]:
    """The readable hosts' loads; ``max_fraction`` overrides each host's own."""
    loads = []
    for host in hosts:
        if host.audit is not None:
            load = host_load(host.host, host.audit, host.blocked)
            loads.append(load if max_fraction is None else replace(load, max_fraction=max_fraction))
    return loads


def safe_now(host: HostInput, min_headroom: float = DEFAULT_MIN_HEADROOM) -> bool:
    """Whether the host can unmerge safely as it is (False: unread, or an audit not readable)."""
    if host.audit is None:
        return False
    try:
        load = host_load(host.host, host.audit, host.blocked)
    except CapacityInputError:
        return False
    return not unsafe_reasons(load, after_moves(load, (), ()), min_headroom)


def safe_first(hosts: Sequence[HostInput], min_headroom: float = DEFAULT_MIN_HEADROOM) -> list[str]:
    """
    The hosts' names, those safe as they are (no move needed) first, then the rest (unsafe,
    blocked by their settings, unread); the given order within each group. ``unmerge --order
    plan`` rolls out in this order.
    """
    safe = [host.host for host in hosts if safe_now(host, min_headroom)]
    return safe + [host.host for host in hosts if host.host not in safe]


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


def _membership(audit: Mapping[str, object]) -> tuple[str | None, str | None]:
    """The audit's cluster and node names from ``/etc/pve/.members``; (None, None): unknown."""
    cluster = audit.get("cluster")
    if not isinstance(cluster, Mapping):
        return None, None
    name, node = cluster.get("name"), cluster.get("node")
    return (
        name if isinstance(name, str) and name else None,
        node if isinstance(node, str) and node else None,
    )


def pool_key(audit: Mapping[str, object]) -> PoolKey | None:
    """
    The pool of a host: its cluster; a Proxmox VE node in no cluster is a pool of its own (``qm
    migrate`` stays within a cluster); None when the audit does not say (membership unknown).
    """
    cluster, node = _membership(audit)
    if cluster is not None:
        return PoolKey(cluster)
    return PoolKey(None, node) if node is not None else None


def node_of(audit: Mapping[str, object]) -> tuple[str | None, str | None]:
    """
    The host's Proxmox VE node name and where it was found: the ``nodename`` of its
    ``/etc/pve/.members`` (``cluster.node``: ``cluster``), else its own hostname
    (``evidence.hostname``, in a report's audits) up to the first dot, as Proxmox VE names nodes
    (``hostname``). (None, None) when absent or not a name.
    """
    _, node = _membership(audit)
    if node is not None:
        return node, "cluster"
    evidence = audit.get("evidence")
    hostname = evidence.get("hostname") if isinstance(evidence, Mapping) else None
    name = hostname.strip().split(".")[0] if isinstance(hostname, str) else ""
    return (name, "hostname") if name else (None, None)


def node_name(audit: Mapping[str, object]) -> str | None:
    """The host's Proxmox VE node name (``node_of``), None when the audit does not say it."""
    return node_of(audit)[0]


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
    node, node_from = node_of(audit)
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
        node=node,
        node_from=node_from,
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
