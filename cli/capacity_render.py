"""Turn a ``CapacityPlan`` into the table or the JSON document ``ksm-guard plan`` prints."""

from __future__ import annotations

import json
from typing import Any

from ksm_guard.operations.capacity import (
    CapacityPlan,
    HostCapacity,
    HostInput,
    Memory,
    Move,
    NPlusOne,
    Outcome,
    Pool,
)
from ksm_guard.operations.report import human_bytes

from .render import _columns


def _share(part: int, whole: int) -> str:
    return f"{part / whole * 100:.1f}%" if whole else "-"


def _left(memory: Memory, mem_total: int) -> str:
    return f"{human_bytes(memory.left)} ({_share(memory.left, mem_total)})"


def _configured(host: HostCapacity) -> str:
    """Configured VM memory and its ratio to RAM; ``+2?``: two VMs do not say theirs."""
    if not host.load.vms:
        return "-"
    if host.overcommit is None:
        return f"? ({len(host.load.vms)} VMs)"
    unknown = f" +{host.vm_configured_unknown}?" if host.vm_configured_unknown else ""
    return f"{human_bytes(host.vm_configured)}{unknown} ({host.overcommit:.2f}x)"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _row(host: HostCapacity | HostInput, moves: bool) -> list[str]:
    if isinstance(host, HostInput):
        return [host.host, *["-"] * (9 if moves else 7)]
    row = [
        host.host,
        human_bytes(host.load.mem_total),
        human_bytes(host.now.available),
        human_bytes(host.now.need),
        f"{human_bytes(host.now.need)} / {human_bytes(host.allowed)}",
        _left(host.now, host.load.mem_total),
        _configured(host),
        _yes(host.safe_now),
    ]
    if moves:
        row += [_left(host.after, host.load.mem_total), _yes(host.safe_after)]
    return row


def move_line(move: Move) -> str:
    """``VM 101 (db1): pve-a1 → pve-b1, 12.0 GiB (rss; 3.0 GiB merged)``."""
    vm = move.vm
    merged = vm.merged_bytes + vm.zero_bytes
    return (
        f"{vm.label}: {move.source} → {move.target}, {human_bytes(move.size_bytes)} "
        f"({vm.size_source}; {human_bytes(merged)} merged)"
    )


def search_words(plan: CapacityPlan) -> str:
    """How the moves were chosen: the fewest bytes for sure, or the greedy's."""
    if plan.exhaustive:
        return "the fewest bytes, searched exhaustively"
    return "greedy: too many VMs to search them all"


def command_line(move: Move) -> str | None:
    """``on pve-a: qm migrate 102 pve-c --online``: where to run what (None: not a Proxmox VM)."""
    if move.command is None:
        return None
    return f"on {move.source_node or move.source}: {move.command}"


def node_notes(plan: CapacityPlan) -> list[str]:
    """The hosts the qm lines name by inventory name: their audits carry no hostname."""
    named = {
        name
        for move in plan.moves
        if move.command is not None
        for name, node in ((move.source, move.source_node), (move.target, move.target_node))
        if node is None
    }
    return [
        f"{name}: no node name in its audit (evidence.hostname): "
        "the qm lines use its inventory name"
        for name in plan.order
        if name in named
    ]


def n_plus_1_line(plan: CapacityPlan) -> str:
    """Whether the others, KSM off, take the VMs of the most loaded host if it fails."""
    return n_plus_1_text(plan.n_plus_1, plan.min_headroom)


def n_plus_1_text(check: NPlusOne | None, min_headroom: float) -> str:
    """One pool's N+1 line."""
    if check is None or check.host is None:
        return "N+1: no VM memory known: no host's failure to weigh"
    unknown = f", {check.unknown} of unknown size not counted" if check.unknown else ""
    vms = f"its {check.vms} VM(s) ({human_bytes(check.bytes)}{unknown})"
    keeping = f"each keeping {min_headroom * 100:g}% of RAM available"
    if check.fits:
        return f"N+1: if {check.host} fails, {vms} fit on the other hosts with KSM off, {keeping}"
    how = "" if check.exhaustive else " (greedy packing: too many VMs to try every one)"
    return (
        f"N+1: if {check.host} fails, {vms} do not fit on the other hosts with KSM off, "
        f"{keeping}: {human_bytes(check.shortfall)} short{how}"
    )


def outcome_lines(plan: CapacityPlan) -> list[str]:
    """Each pool's outcome and N+1 line; with one pool, its N+1 line (the summary says the rest)."""
    return pool_lines(plan) or [n_plus_1_line(plan)]


def pool_lines(plan: CapacityPlan) -> list[str]:
    """With several pools, each pool's outcome and N+1 line (moves never leave a pool)."""
    if len(plan.pools) < 2:
        return []
    lines = []
    for pool in plan.pools:
        if pool.outcome is Outcome.IMPOSSIBLE:
            outcome = f"cannot be made safe, {human_bytes(pool.missing)} of RAM missing"
        elif pool.moves:
            outcome = f"safe after {pool.moves} move(s), {human_bytes(pool.moved_bytes)}"
        else:
            outcome = "every host safe, no moves needed"
        alone = pool.key is not None and pool.key.cluster is None
        members = "" if alone else f" ({', '.join(pool.hosts)})"
        lines += [
            f"{pool.label}{members}: {outcome}",
            f"  {n_plus_1_text(pool.n_plus_1, plan.min_headroom)}",
        ]
    return lines


def summary_line(plan: CapacityPlan, code: int) -> str:
    """The run in one line (``outlook``) and the exit code."""
    return f"{outlook(plan)}; exit {code}"


def outlook(plan: CapacityPlan) -> str:
    """
    The run in one line: RAM, what KSM saves, what is left after unmerge, the moves; ``pool``,
    or ``fleet`` when the hosts fall into several pools (one per Proxmox VE cluster).
    """
    hosts = plan.hosts
    total = sum(host.load.mem_total for host in hosts)
    left = sum(host.now.left for host in hosts)
    unsafe = sum(not host.safe_now for host in hosts)
    unread = f", {len(plan.unread)} unread" if plan.unread else ""
    fleet = len(plan.pools) > 1
    where = f"fleet of {len(plan.pools)} pools" if fleet else "pool"
    text = (
        f"{where}: {len(hosts)} host(s){unread}, {unsafe} unsafe as they are; "
        f"RAM {human_bytes(total)}, available {human_bytes(sum(h.now.available for h in hosts))}, "
        f"KSM saves {human_bytes(sum(h.now.need for h in hosts))}; after unmerge "
        f"{human_bytes(left)} ({_share(left, total)}) available"
    )
    moved = sum(move.size_bytes for move in plan.moves)
    if plan.moves:
        text += f"; {len(plan.moves)} move(s), {human_bytes(moved)}"
    if plan.outcome is Outcome.IMPOSSIBLE:
        short = [host for host in hosts if not host.safe_after]
        lacking = [f"{h.host} {human_bytes(h.missing)}" for h in short if h.missing is not None]
        blocked = [host.host for host in short if host.missing is None]
        if lacking:
            text += (
                f"; the {'fleet' if fleet else 'pool'} cannot absorb it: "
                f"{human_bytes(plan.missing)} of RAM missing "
                f"({', '.join(lacking)})"
            )
        if blocked:
            text += f"; settings block unmerge on {', '.join(blocked)}"
    elif plan.moves:
        text += ": every host safe after the moves"
    else:
        read = " read" if plan.unread else ""
        text += f": every host{read} safe, no moves needed"
    return text


def grid(plan: CapacityPlan) -> list[list[str]]:
    """The per-host table, header first; the after-moves columns only when there are moves."""
    moves = bool(plan.moves)
    header = ["HOST", "RAM", "AVAILABLE", "KSM SAVED", "NEED / ALLOWED", "LEFT AFTER UNMERGE"]
    header += ["VM CONFIGURED", "SAFE"]
    if moves:
        header += ["LEFT AFTER MOVES", "SAFE AFTER"]
    return [header] + [_row(host, moves) for host in plan.in_order()]


def notes(plan: CapacityPlan) -> list[str]:
    """Why hosts are unsafe, before and after the moves, and the hosts that were not read."""
    found = node_notes(plan)
    for host in plan.hosts:
        if not host.safe_now:
            found.append(f"{host.host}: unsafe: {'; '.join(host.reasons_now)}")
        if not host.safe_after and plan.moves:
            missing = "" if host.missing is None else f", {human_bytes(host.missing)} missing"
            found.append(f"{host.host}: still unsafe after the moves{missing}")
    return found + [f"{host.host}: {host.detail}" for host in plan.unread]


def table(plan: CapacityPlan, code: int) -> str:
    """One row per host, the moves, why hosts are unsafe, the N+1 line, then the pool line."""
    moves = bool(plan.moves)
    lines = _columns(grid(plan))
    if moves:
        lines += [
            "",
            f"moves ({search_words(plan)}; once disable has stopped merging everywhere, "
            "before unmerge; nothing is run):",
        ]
        for move in plan.moves:
            command = command_line(move)
            lines += [f"  {move_line(move)}", *([f"    {command}"] if command else [])]
    found = notes(plan)
    if found:
        lines += ["", *found]
    return "\n".join([*lines, "", *outcome_lines(plan), summary_line(plan, code)])


def _figures(memory: Memory, host: HostCapacity) -> dict[str, Any]:
    return {
        "mem_available_bytes": memory.available,
        "unmerge_need_bytes": memory.need,
        "unmerge_allowed_bytes": int(memory.available * host.load.max_fraction),
        "available_after_unmerge_bytes": memory.left,
        "headroom_after_unmerge": round(memory.left / host.load.mem_total, 4),
    }


def _capacity(host: HostCapacity) -> dict[str, Any]:
    return {
        "mem_total_bytes": host.load.mem_total,
        "saved_bytes": host.now.need,
        "unmerge_max_fraction": host.load.max_fraction,
        **_figures(host.now, host),
        "vm_configured_bytes": host.vm_configured,
        "vms_configured_unknown": host.vm_configured_unknown,
        "overcommit": None if host.overcommit is None else round(host.overcommit, 4),
        "safe": host.safe_now,
        "reasons": list(host.reasons_now),
        "after_moves": {
            "moved_out_bytes": host.moved_out,
            "moved_in_bytes": host.moved_in,
            **_figures(host.after, host),
            "safe": host.safe_after,
            "reasons": list(host.reasons_after),
            "missing_bytes": host.missing,
        },
    }


def _move(move: Move) -> dict[str, Any]:
    vm = move.vm
    return {
        "vmid": vm.vmid,
        "name": vm.name,
        "pid": vm.pid,
        "from": move.source,
        "to": move.target,
        "bytes": move.size_bytes,
        "command": move.command,
        "run_on": move.source_node or move.source,
        "to_node": move.target_node or move.target,
        "to_node_from": move.target_node_from or "inventory",
        "size_from": vm.size_source,
        "rss_bytes": vm.rss_bytes,
        "configured_bytes": vm.configured_bytes,
        "merged_bytes": vm.merged_bytes + vm.zero_bytes,
    }


def _host(host: HostCapacity | HostInput) -> dict[str, Any]:
    """A host of the document: ``safe_now`` and ``headroom_after_bytes`` (after the moves) up
    front, the figures in ``capacity``; all null for a host that could not be read."""
    if isinstance(host, HostInput):
        return {
            "host": host.host,
            "node": None,
            "safe_now": None,
            "safe_after": None,
            "headroom_after_bytes": None,
            "detail": host.detail,
            "capacity": None,
        }
    return {
        "host": host.host,
        "node": host.load.node,
        "safe_now": host.safe_now,
        "safe_after": host.safe_after,
        "headroom_after_bytes": host.after.left,
        "detail": None,
        "capacity": _capacity(host),
    }


def plan_document(plan: CapacityPlan, code: int) -> dict[str, Any]:
    """The ``plan -o json`` document (``schema_version`` 1) as a dict."""
    from .engine import SCHEMA_VERSION

    hosts = plan.hosts
    feasible = plan.outcome is not Outcome.IMPOSSIBLE
    return {
        "schema_version": SCHEMA_VERSION,
        "mode": "plan",
        "exit_code": code,
        "outcome": plan.outcome,
        "feasible": feasible,
        "shortfall_bytes": 0 if feasible else plan.missing,
        "search": "exhaustive" if plan.exhaustive else "greedy",
        "min_headroom": plan.min_headroom,
        "summary": {
            "hosts": len(hosts) + len(plan.unread),
            "unread": len(plan.unread),
            "safe": sum(host.safe_now for host in hosts),
            "safe_after_moves": sum(host.safe_after for host in hosts),
            "mem_total_bytes": sum(host.load.mem_total for host in hosts),
            "mem_available_bytes": sum(host.now.available for host in hosts),
            "saved_bytes": sum(host.now.need for host in hosts),
            "available_after_unmerge_bytes": sum(host.now.left for host in hosts),
            "moves": len(plan.moves),
            "moved_bytes": sum(move.size_bytes for move in plan.moves),
            "missing_bytes": plan.missing,
        },
        "hosts": [_host(host) for host in plan.in_order()],
        "moves": [_move(move) for move in plan.moves],
        "n_plus_1": _n_plus_1(plan.n_plus_1),
        "pools": [_pool(pool) for pool in plan.pools],
    }


def _pool(pool: Pool) -> dict[str, Any]:
    key = pool.key
    return {
        "cluster": key.cluster if key else None,
        "node": key.node if key else None,
        "label": pool.label,
        "hosts": list(pool.hosts),
        "outcome": pool.outcome,
        "feasible": pool.outcome is not Outcome.IMPOSSIBLE,
        "shortfall_bytes": pool.missing if pool.outcome is Outcome.IMPOSSIBLE else 0,
        "moves": pool.moves,
        "moved_bytes": pool.moved_bytes,
        "search": "exhaustive" if pool.exhaustive else "greedy",
        "n_plus_1": _n_plus_1(pool.n_plus_1),
    }


def _n_plus_1(check: NPlusOne | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {
        "host": check.host,
        "bytes": check.bytes,
        "vms": check.vms,
        "vms_size_unknown": check.unknown,
        "fits": check.fits,
        "shortfall_bytes": check.shortfall,
        "search": "exhaustive" if check.exhaustive else "greedy",
    }


def as_json(plan: CapacityPlan, code: int) -> str:
    """The ``plan -o json`` document, printed."""
    return json.dumps(plan_document(plan, code), indent=2)
