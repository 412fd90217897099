"""
The capacity plan's forecast against a real unmerge: two guests with merged workloads of
different sizes, KSM stopped by ``disable`` (the counters hold still), ``plan`` read, then
``unmerge``; each guest's free memory is read by the test itself before and after.

What the unmerge really costs is measured as the fall of MemAvailable plus the pages on the
per-CPU free lists (the ``count:`` of every pageset in /proc/zoneinfo): the kernel counts those
free pages in neither MemFree nor MemAvailable, and a merge frees its duplicates onto them, so
MemAvailable alone can hide much of the cost (on this machine's 6.18 kernel, all of a 128 MiB
unmerge: measured). Tolerance: within ``TOLERANCE_BYTES`` + ``TOLERANCE_SHARE`` of the need the
plan forecast: page cache, slab and the processes started for the reads move free memory too,
and the KSM pages themselves (``pages_shared``) are freed when their last mapper un-shares. The
figures are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.test_scenarios import inventory, ksm_guard, sysfs
from tests.results import hosts_of
from tests.vm.guest import Guest

WORKLOADS_MIB = {"cap-small": 64, "cap-large": 224}  # different sizes, both < 50% of MemAvailable
TOLERANCE_BYTES = 16 << 20
TOLERANCE_SHARE = 0.05
MIB = 1 << 20


def free_memory(guest: Guest) -> tuple[int, int]:
    """The guest's MemAvailable and the bytes on its per-CPU free lists, in one read."""
    available, pcp, page_size = guest.ssh(
        "awk '/^MemAvailable:/ {print $2 * 1024}' /proc/meminfo;"
        " awk '$1 == \"count:\" {n += $2} END {print n + 0}' /proc/zoneinfo; getconf PAGESIZE"
    ).stdout.split()
    return int(available), int(pcp) * int(page_size)


def test_the_plans_forecast_matches_the_real_unmerge(fresh_guest: Any, tmp_path: Path) -> None:
    """Per host: the plan's unmerge need is what the unmerge really costs, within tolerance."""
    guests = {name: fresh_guest("debian", name=name) for name in WORKLOADS_MIB}
    for name, mib in WORKLOADS_MIB.items():
        guests[name].start_workload(mib)
    path = inventory(tmp_path, *guests.values())

    disabled = ksm_guard("disable", "--yes", "-i", path)
    assert disabled.returncode == 0, disabled.stdout + disabled.stderr
    assert all(sysfs(guest, "run") == 0 for guest in guests.values())

    planned = ksm_guard("plan", "-i", path, "-o", "json")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    forecast = {host["host"]: host["capacity"] for host in hosts_of(planned).values()}
    before = {name: free_memory(guest) for name, guest in guests.items()}

    unmerged = ksm_guard("unmerge", "--yes", "-i", path, "-o", "json")
    assert unmerged.returncode == 0, unmerged.stdout + unmerged.stderr
    results = hosts_of(unmerged)
    after = {name: free_memory(guest) for name, guest in guests.items()}

    for name, guest in guests.items():
        need = forecast[name]["unmerge_need_bytes"]
        (available_before, pcp_before), (available_after, pcp_after) = before[name], after[name]
        cost = available_before + pcp_before - available_after - pcp_after
        error = cost - need
        print(
            f"{name}: workload {WORKLOADS_MIB[name]} MiB; plan: need {need / MIB:.1f} MiB, "
            f"MemAvailable {forecast[name]['mem_available_bytes'] / MIB:.1f} MiB, after unmerge "
            f"{forecast[name]['available_after_unmerge_bytes'] / MIB:.1f} MiB; measured: "
            f"MemAvailable {available_before / MIB:.1f} -> {available_after / MIB:.1f} MiB, "
            f"per-CPU lists {pcp_before / MIB:.1f} -> {pcp_after / MIB:.1f} MiB, cost "
            f"{cost / MIB:.1f} MiB; error {error / MIB:+.1f} MiB ({error / need * 100:+.1f}% of "
            f"the need); un-shared {results[name]['unmerge']['bytes'] / MIB:.1f} MiB"
        )
        assert need >= WORKLOADS_MIB[name] * MIB * 0.9  # the workload's pages, nearly all
        assert abs(error) <= TOLERANCE_BYTES + TOLERANCE_SHARE * need, name
        assert results[name]["unmerge"]["bytes"] == need  # what the unmerge itself counted
        assert (sysfs(guest, "pages_shared"), sysfs(guest, "pages_sharing")) == (0, 0)
