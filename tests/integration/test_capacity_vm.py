"""
The capacity plan's forecast against a real unmerge: two guests with merged workloads of
different sizes, KSM stopped by ``disable`` (the counters hold still), ``plan`` read, then
``unmerge``; MemAvailable is read in each guest by the test itself before and after.

Tolerance: the unmerge's measured cost (MemAvailable before - after) is within
``TOLERANCE_BYTES`` + ``TOLERANCE_SHARE`` of the need the plan forecast. The rest of the guest
moves MemAvailable too (page cache, slab, ksmd's own metadata, sshd and Python starting for the
reads), and the KSM pages themselves (``pages_shared``, a few hundred) are freed when their last
mapper un-shares. The figures are printed (``pytest -s``) for the record.
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


def mem_available(guest: Guest) -> int:
    """The guest's MemAvailable in bytes, read from /proc/meminfo."""
    line = guest.ssh("grep '^MemAvailable:' /proc/meminfo").stdout.split()
    return int(line[1]) * 1024


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
    before = {name: mem_available(guest) for name, guest in guests.items()}

    unmerged = ksm_guard("unmerge", "--yes", "-i", path, "-o", "json")
    assert unmerged.returncode == 0, unmerged.stdout + unmerged.stderr
    results = hosts_of(unmerged)
    after = {name: mem_available(guest) for name, guest in guests.items()}

    for name, guest in guests.items():
        need = forecast[name]["unmerge_need_bytes"]
        cost = before[name] - after[name]
        error = cost - need
        print(
            f"{name}: workload {WORKLOADS_MIB[name]} MiB; plan: need {need / MIB:.1f} MiB, "
            f"available after {forecast[name]['available_after_unmerge_bytes'] / MIB:.1f} MiB "
            f"(read {forecast[name]['mem_available_bytes'] / MIB:.1f} MiB); measured: "
            f"{before[name] / MIB:.1f} → {after[name] / MIB:.1f} MiB, cost {cost / MIB:.1f} MiB; "
            f"error {error / MIB:+.1f} MiB ({error / need * 100:+.1f}% of the need); "
            f"un-shared {results[name]['unmerge']['bytes'] / MIB:.1f} MiB"
        )
        assert need >= WORKLOADS_MIB[name] * MIB * 0.9  # the workload's pages, nearly all
        assert abs(error) <= TOLERANCE_BYTES + TOLERANCE_SHARE * need, name
        predicted_after = forecast[name]["available_after_unmerge_bytes"]
        drift = forecast[name]["mem_available_bytes"] - before[name]  # moved between the reads
        assert abs(after[name] - predicted_after + drift) <= TOLERANCE_BYTES + 0.05 * need, name
        assert results[name]["unmerge"]["bytes"] == need  # the pages it un-shared, exactly
        assert (sysfs(guest, "pages_shared"), sysfs(guest, "pages_sharing")) == (0, 0)
