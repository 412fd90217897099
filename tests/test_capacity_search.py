"""
The planner's moves against an exhaustive search on small fleets (up to 3 hosts and 5 VMs that
can move, random sizes, seeded): every way of leaving each VM of an unsafe host in place or
moving it to a host safe as it is, judged by the model's own functions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import product
from typing import Any, cast

import pytest

from ksm_guard.operations.capacity import (
    SEARCH_VMS,
    CapacityPlan,
    HostInput,
    Memory,
    Outcome,
    VmLoad,
    after_moves,
    host_load,
    hosts_from_document,
    memory_reasons,
    plan_capacity,
    unsafe_reasons,
)
from tests.test_capacity import CASES, assert_moves_only_shift_memory, load_case

GIB = 1 << 30
STEP = GIB // 4


def small_fleet(rng: random.Random) -> list[HostInput]:
    """2 or 3 hosts; the first one or two short of memory, with 1 to 5 VMs between them."""
    count = rng.randint(2, 3)
    short = rng.randint(1, count - 1)
    vms_left = rng.randint(1, 5)
    hosts, pids = [], iter(range(1001, 2000))
    for number in range(count):
        total = rng.choice([32, 64]) * GIB
        vms = []
        if number < short:
            many = vms_left if number == short - 1 else rng.randint(0, vms_left)
            vms_left -= many
            for pid in (next(pids) for _ in range(many)):
                rss = rng.randint(2, 80) * STEP
                vms.append(
                    {"pid": pid, "vmid": str(pid), "name": None, "rss_bytes": rss,
                     "configured_bytes": rss,
                     "merged_bytes": rng.randint(0, min(rss, 8 * GIB) // STEP) * STEP,
                     "ksm_zero_pages": rng.choice([0, 0, rng.randint(0, 1 << 18)])}
                )  # fmt: skip
            memory = {"mem_available_bytes": rng.randint(0, 16) * GIB,
                      "unmerge_need_bytes": rng.randint(2, 16) * GIB,
                      "pages_shared": rng.choice([0, rng.randint(0, 1 << 19)]),
                      "unmerge_max_fraction": rng.choice([0.5, 0.5, 0.25, 0.9])}  # fmt: skip
        else:
            memory = {"mem_available_bytes": rng.randint(8, 40) * GIB,
                      "unmerge_need_bytes": rng.randint(0, 4) * GIB,
                      "pages_shared": 0, "unmerge_max_fraction": 0.5}  # fmt: skip
        audit = {"mem_total_bytes": total, "page_size": 4096, "vms": vms, **memory}
        hosts.append(HostInput(f"h{number}", cast(dict[str, object], audit)))
    return hosts


def optimum(hosts: Sequence[HostInput], min_headroom: float) -> tuple[int, int] | None:
    """
    The fewest bytes, then moves, that make every host safe, trying every assignment; None:
    no assignment does. Targets are judged as they end, not by the planner's room figures.
    """
    loads = [host_load(host.host, cast(dict[str, Any], host.audit)) for host in hosts]
    unsafe = {
        load.host for load in loads if unsafe_reasons(load, after_moves(load, (), ()), min_headroom)
    }
    targets = [load.host for load in loads if load.host not in unsafe]
    movable = [
        (load.host, vm)
        for load in loads
        if load.host in unsafe
        for vm in load.vms
        if vm.size_bytes is not None
    ]
    best = None
    for choice in product(range(len(targets) + 1), repeat=len(movable)):
        out: dict[str, list[VmLoad]] = {load.host: [] for load in loads}
        into: dict[str, list[VmLoad]] = {load.host: [] for load in loads}
        for (source, vm), target in zip(movable, choice, strict=True):
            if target:
                out[source].append(vm)
                into[targets[target - 1]].append(vm)
        if all(
            not unsafe_reasons(
                load, after_moves(load, out[load.host], into[load.host]), min_headroom
            )
            for load in loads
        ):
            gone = [vm for vms in out.values() for vm in vms]
            cost = (sum(vm.size_bytes or 0 for vm in gone), len(gone))
            best = cost if best is None or cost < best else best
    return best


def moved(plan: CapacityPlan) -> tuple[int, int]:
    return sum(move.size_bytes for move in plan.moves), len(plan.moves)


def case(seed: int) -> tuple[list[HostInput], float]:
    rng = random.Random(seed)
    return small_fleet(rng), rng.choice([0, 0.1, 0.2])


@pytest.mark.parametrize("seed", range(300))
def test_the_plan_moves_the_fewest_bytes_there_are(seed: int) -> None:
    """
    On a small fleet the plan is feasible exactly when some assignment is, moves the fewest
    bytes (then the fewest VMs) any does, says it searched exhaustively, and overfills no target.
    """
    hosts, min_headroom = case(seed)
    plan = plan_capacity(hosts, min_headroom)
    best = optimum(hosts, min_headroom)
    assert plan.exhaustive
    assert (plan.outcome is not Outcome.IMPOSSIBLE) == (best is not None)
    if best is not None:
        assert moved(plan) == best
    assert_moves_only_shift_memory(plan)  # targets safe before and after


def n_plus_1_fits(plan: CapacityPlan) -> bool | None:
    """
    Whether some assignment of the most loaded host's VMs (after the moves) to the other hosts
    safe after the moves leaves each of them ``min_headroom`` of RAM with KSM off (need 0,
    ``MemAvailable - need`` left). None: no VM memory anywhere.
    """
    running = {host.host: list(host.load.vms) for host in plan.hosts}
    for move in plan.moves:
        running[move.source].remove(move.vm)
        running[move.target].append(move.vm)
    weight = {name: sum(vm.size_bytes or 0 for vm in vms) for name, vms in running.items()}
    if not any(weight.values()):
        return None
    failed = max(plan.hosts, key=lambda host: weight[host.host])
    others = [host for host in plan.hosts if host is not failed and host.safe_after]
    vms = [vm for vm in running[failed.host] if vm.size_bytes is not None]
    for choice in product(range(len(others)), repeat=len(vms)):
        taken = [0] * len(others)
        for vm, index in zip(vms, choice, strict=True):
            taken[index] += vm.size_bytes or 0
        if all(
            not memory_reasons(host.load, Memory(host.after.left - extra, 0), plan.min_headroom)
            for host, extra in zip(others, taken, strict=True)
        ):
            return True
    return False


@pytest.mark.parametrize("seed", range(300))
def test_n_plus_1_fits_exactly_when_some_placement_does(seed: int) -> None:
    """The N+1 check against every placement of the failed host's VMs on the others."""
    hosts, min_headroom = case(seed)
    plan = plan_capacity(hosts, min_headroom)
    check = plan.n_plus_1
    assert check is not None and check.exhaustive
    fits = n_plus_1_fits(plan)
    assert check.fits is (fits is not False)
    assert (check.host is None) is (fits is None)
    assert (check.shortfall > 0) is (not check.fits)
    assert check.shortfall <= check.bytes


def greedy_figures(fleets: int) -> dict[str, float]:
    """
    The greedy alone (``search_steps=0``) over the first ``fleets`` seeds, on those that need
    moves and have a plan: the share it finds a plan for, the share it finds the fewest bytes
    for, and its bytes over the fewest (mean, 90th and 99th percentile, worst).
    """
    needing = found = optimal = 0
    ratios = []
    for seed in range(fleets):
        hosts, min_headroom = case(seed)
        best = optimum(hosts, min_headroom)
        if best is None or best == (0, 0):
            continue
        needing += 1
        greedy = plan_capacity(hosts, min_headroom, search_steps=0)
        assert_moves_only_shift_memory(greedy)  # targets never overfilled, greedy alone too
        if greedy.outcome is not Outcome.IMPOSSIBLE:
            found += 1
            optimal += moved(greedy)[0] == best[0]
            ratios.append(moved(greedy)[0] / best[0])
    ratios.sort()
    return {
        "fleets": needing,
        "found": found / needing,
        "optimal": optimal / needing,
        "mean": sum(ratios) / len(ratios),
        "p90": ratios[int(len(ratios) * 0.9)],
        "p99": ratios[int(len(ratios) * 0.99)],
        "max": ratios[-1],
    }


def test_the_greedy_alone_comes_close() -> None:
    """
    The greedy alone, the plan of fleets too large to search, against the optimum on 1000
    small fleets: printed (pytest -s), and held a little below the figures the README gives.
    Over the first 10 000 seeds (3700 fleets that need moves and have a plan) it finds a plan
    for 98.4%, the fewest bytes for 84.6%; its bytes are 1.047 x the fewest on average, 1.10 x
    at the 90th percentile, 2.0 x at the 99th, 3.83 x at worst. (1000 seeds: 384 fleets, 97.9%,
    84.1%, 1.052 x, 1.067 x, 2.1 x, 3.24 x.)
    """
    figures = greedy_figures(1000)
    print("\ngreedy alone:", ", ".join(f"{key} {value:.3f}" for key, value in figures.items()))
    assert figures["found"] >= 0.97
    assert figures["optimal"] >= 0.75
    assert figures["mean"] <= 1.1
    assert figures["p90"] <= 1.5


def test_the_search_finds_the_plan_the_greedy_misses() -> None:
    """largest_first_misses_a_plan: the greedy alone finds none; the plan as shipped does."""
    document, _, _ = load_case(CASES[0].parent / "largest_first_misses_a_plan.yaml")
    hosts = hosts_from_document(document)
    greedy = plan_capacity(hosts, search_steps=0)
    assert greedy.outcome is Outcome.IMPOSSIBLE
    assert not greedy.exhaustive
    assert [move.vm.vmid for move in greedy.moves] == ["101"]
    plan = plan_capacity(hosts)
    assert plan.outcome is Outcome.MOVES and plan.exhaustive
    assert [move.vm.vmid for move in plan.moves] == ["102", "103"]


def _crowded(vms: int) -> list[HostInput]:
    """One host short of memory running ``vms`` VMs of 1 GiB, one host with room for all."""
    crowded = {"mem_total_bytes": 256 * GIB, "mem_available_bytes": 0,
               "unmerge_need_bytes": 4 * GIB, "pages_shared": 0, "page_size": 4096,
               "unmerge_max_fraction": 0.5,
               "vms": [{"pid": pid, "vmid": str(pid), "rss_bytes": GIB, "merged_bytes": GIB // 4}
                       for pid in range(100, 100 + vms)]}  # fmt: skip
    roomy = {**crowded, "mem_available_bytes": 200 * GIB, "unmerge_need_bytes": 0, "vms": []}
    return [HostInput("a", cast(dict[str, object], crowded)), HostInput("b", roomy)]


@pytest.mark.parametrize(("vms", "exhaustive"), [(SEARCH_VMS, True), (SEARCH_VMS + 1, False)])
def test_beyond_search_vms_the_greedy_plan_stands(vms: int, exhaustive: bool) -> None:
    """Up to SEARCH_VMS VMs to weigh the search runs; beyond, the greedy's plan is the plan."""
    plan = plan_capacity(_crowded(vms))
    assert plan.exhaustive is exhaustive
    assert plan.outcome is Outcome.MOVES
    if not exhaustive:
        assert plan.moves == plan_capacity(_crowded(vms), search_steps=0).moves
