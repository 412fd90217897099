"""ksm-guard end to end on real Debian 13 and 12 VMs, verified with testinfra (never ksm-guard's
facts). Every scenario runs on Debian 13 (trixie, Proxmox VE 9's base); audit, disable, unmerge,
reboot and enable run on Debian 12 (bookworm, Proxmox VE 8's base) as well."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.netutil import free_port
from tests.conftest import BIN
from tests.results import hosts_of
from tests.vm.guest import Guest
from tests.vm.inventory import write_inventory
from tests.vm.recipe import RELEASES

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"debian": ("ksmtuned.service", "ksm.service"), "pve": ("ksmtuned.service",)}


def ksm_guard(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as an admin would; stdout is the result."""
    return subprocess.run(
        [str(BIN / "ksm-guard"), *args], capture_output=True, text=True, timeout=timeout,
        check=False, cwd=ROOT,
    )  # fmt: skip


def inventory(tmp_path: Path, *entries: Any, extra: tuple[Any, ...] = ()) -> str:
    """A pyinfra inventory file for these guests (or raw entries)."""
    return str(write_inventory(tmp_path / "vms.py", entries, extra_hosts=extra))


def sysfs(guest: Guest, name: str) -> int:
    """A KSM counter read with testinfra."""
    return int(guest.testinfra_host().file(f"/sys/kernel/mm/ksm/{name}").content_string.strip())


def unit_state(guest: Guest, unit: str) -> tuple[str, str]:
    """(UnitFileState, ActiveState) read with testinfra."""
    properties = guest.testinfra_host().service(unit).systemd_properties
    return properties.get("UnitFileState", ""), properties.get("ActiveState", "")


@pytest.fixture
def merged(fresh_guest) -> Any:
    """A factory: a pristine guest of a flavour with ksmtuned running and real merged pages."""

    def start(flavour: str, mib: int = 64) -> Guest:
        guest = fresh_guest(flavour)
        guest.start_workload(mib)
        return guest

    return start


# 1. Audit of a fresh host --------------------------------------------------------------


@pytest.mark.releases(*RELEASES)
@pytest.mark.parametrize("flavour", ["debian", "pve"])
def test_audit_of_a_fresh_host_is_non_compliant(merged, tmp_path: Path, flavour: str) -> None:
    """ksmtuned on and pages merged: verdict ksm-running, saved bytes > 0, exit 1."""
    guest = merged(flavour)
    result = ksm_guard("audit", "-i", inventory(tmp_path, guest), "-o", "json")
    host = hosts_of(result)[guest.name]
    assert result.returncode == 1, result.stderr
    assert host["verdict"] == "ksm-running"
    assert host["audit"]["saved_bytes"] > 0
    assert host["audit"]["units"]["ksmtuned.service"]["present"] is True


# 2. Dry runs change nothing -----------------------------------------------------------------


def test_cli_dry_run_shows_the_diff_and_changes_nothing(merged, tmp_path: Path) -> None:
    """disable --dry-run lists the unit and run changes; the guest is untouched."""
    guest = merged("debian")
    result = ksm_guard("disable", "--dry-run", "-i", inventory(tmp_path, guest), "-o", "json")
    host = hosts_of(result)[guest.name]
    assert host["status"] == "would-change"
    assert "ksmtuned.service: enabled/active → disabled/inactive" in host["changes"]
    assert unit_state(guest, "ksmtuned.service") == ("enabled", "active")
    assert sysfs(guest, "run") == 1


def test_pyinfra_dry_run_shows_the_diff_and_changes_nothing(merged, tmp_path: Path) -> None:
    """`pyinfra INV deploy.py --dry --data ksm_mode=disable` shows the diff and changes nothing."""
    guest = merged("debian")
    result = subprocess.run(
        [str(BIN / "pyinfra"), inventory(tmp_path, guest), "deploy.py", "--dry",
         "--data", "ksm_mode=disable"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ksmtuned.service: enabled/active → disabled/inactive" in result.stderr + result.stdout
    assert unit_state(guest, "ksmtuned.service") == ("enabled", "active")
    assert sysfs(guest, "run") == 1


# 3 and 4. disable, unmerge, and again ----------------------------------------------------------


@pytest.mark.releases(*RELEASES)
@pytest.mark.parametrize("flavour", ["debian", "pve"])
def test_disable_then_unmerge_then_nothing_to_do(merged, tmp_path: Path, flavour: str) -> None:
    """disable: units off, run 0, pages still merged; unmerge: counters 0; reruns change nothing."""
    guest = merged(flavour)
    path = inventory(tmp_path, guest)
    disabled = ksm_guard("disable", "--yes", "-i", path)
    assert disabled.returncode == 0, disabled.stdout + disabled.stderr
    assert [unit_state(guest, unit) for unit in UNITS[flavour]] == [
        ("disabled", "inactive") for _ in UNITS[flavour]
    ]
    assert sysfs(guest, "run") == 0
    assert sysfs(guest, "pages_sharing") > 0, "disable must leave merged pages alone"

    unmerged = ksm_guard("unmerge", "--yes", "-i", path)
    assert unmerged.returncode == 0, unmerged.stdout + unmerged.stderr
    assert (sysfs(guest, "pages_shared"), sysfs(guest, "pages_sharing"), sysfs(guest, "run")) == (
        0, 0, 2,
    )  # fmt: skip

    again = [hosts_of(ksm_guard(mode, "--yes", "-i", path, "-o", "json"))[guest.name]
             for mode in ("disable", "unmerge")]  # fmt: skip
    assert [(h["status"], h["changes"]) for h in again] == [("ok", []), ("ok", [])]


# 5. Reboots ---------------------------------------------------------------------------------


def poll(read: Callable[[], int], done: Callable[[int], bool], timeout: float = 60) -> int:
    """Call ``read`` until ``done`` says yes to its value or ``timeout`` passes; return the last."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


@pytest.mark.releases(*RELEASES)
@pytest.mark.parametrize("flavour", ["debian", "pve"])
def test_ksm_stays_off_across_a_reboot_and_enable_brings_it_back(
    merged, tmp_path: Path, flavour: str
) -> None:
    """After disable --mask a reboot keeps KSM off; enable unmasks, enables and starts the units
    again, and KSM comes back with run=1 (debian: ksm.service; pve: ksmtuned's first adjustment,
    2 s in). That enabled units start at boot is systemd's part: the reboot above already proved
    the boot honours the unit file states ksm-guard leaves."""
    guest = merged(flavour)
    path = inventory(tmp_path, guest)
    masked = ksm_guard("disable", "--yes", "--mask", "-i", path)
    assert masked.returncode == 0, masked.stdout + masked.stderr
    first = guest.boot_id()
    guest.reboot()
    assert guest.boot_id() != first
    assert [unit_state(guest, unit) for unit in UNITS[flavour]] == [
        ("masked", "inactive") for _ in UNITS[flavour]
    ]
    assert sysfs(guest, "run") == 0

    enabled = ksm_guard("enable", "--yes", "-i", path)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    assert unit_state(guest, "ksmtuned.service") == ("enabled", "active")
    assert poll(lambda: sysfs(guest, "run"), lambda run: run == 1, timeout=120) == 1


# 6. A host without ksmtuned -------------------------------------------------------------------


def test_host_without_ksmtuned_is_handled(merged, tmp_path: Path) -> None:
    """No ksmtuned installed: disable still stops merging, and says the units are absent."""
    guest = merged("bare")
    path = inventory(tmp_path, guest)
    result = ksm_guard("disable", "--yes", "-i", path, "-o", "json")
    host = hosts_of(result)[guest.name]
    assert result.returncode == 0, result.stderr
    assert host["changes"][0] == "run: 1 → 0"
    assert host["audit"]["units"]["ksmtuned.service"]["present"] is False
    assert sysfs(guest, "run") == 0


# 7. sudo and permission denied ---------------------------------------------------------------


def test_sudo_user_disables(merged, tmp_path: Path) -> None:
    """An admin with passwordless sudo and --sudo gets the job done."""
    guest = merged("debian")
    path = inventory(tmp_path, guest.pyinfra_host(user="admin"))
    result = ksm_guard("disable", "--yes", "--sudo", "-i", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sysfs(guest, "run") == 0


def test_user_without_sudo_is_denied_and_nothing_changes(merged, tmp_path: Path) -> None:
    """A user without root gets 'permission denied', exit 1, and the host is untouched."""
    guest = merged("debian")
    path = inventory(tmp_path, guest.pyinfra_host(user="nosudo"))
    result = ksm_guard("disable", "--yes", "-i", path, "-o", "json")
    host = hosts_of(result)[f"{guest.name}-nosudo"]
    assert result.returncode == 1
    assert host["detail"].startswith("permission denied")
    assert unit_state(guest, "ksmtuned.service") == ("enabled", "active")
    assert sysfs(guest, "run") == 1


def test_sudo_refused_is_an_error_and_nothing_changes(merged, tmp_path: Path) -> None:
    """--sudo for a user sudo refuses: the state cannot be read, exit 3, host untouched."""
    guest = merged("debian")
    path = inventory(tmp_path, guest.pyinfra_host(user="nosudo"))
    result = ksm_guard("disable", "--yes", "--sudo", "-i", path, "-o", "json")
    host = hosts_of(result)[f"{guest.name}-nosudo"]
    assert result.returncode == 3
    assert host["verdict"] == "error"
    assert "permission denied" in host["detail"]
    assert sysfs(guest, "run") == 1


# 8. Unsafe unmerge ----------------------------------------------------------------------------


# Memory a guest's tmpfs holds (shmem: never merged, never reclaimed): MemAvailable as short as
# on a busier host, without a guest of another size and its own snapshot.
HELD_MIB = 256


def test_unsafe_unmerge_is_refused_then_forced(merged, tmp_path: Path) -> None:
    """Merged set above half of MemAvailable: refused with both figures; --force unmerges."""
    guest = merged("debian", mib=400)
    guest.ssh(
        "mkdir -p /run/ksm-guard-held && mount -t tmpfs -o size=300m held /run/ksm-guard-held"
        f" && fallocate -l {HELD_MIB}M /run/ksm-guard-held/pages"
    )
    path = inventory(tmp_path, guest)
    sharing = sysfs(guest, "pages_sharing")
    refused = ksm_guard("unmerge", "--yes", "-i", path, "-o", "json")
    host = hosts_of(refused)[guest.name]
    assert refused.returncode == 1
    assert host["status"] == "refused"
    assert "unsafe unmerge refused: needs" in host["detail"]
    assert "of MemAvailable" in host["detail"]
    # Refused as a whole, before anything ran: not even the disable steps.
    assert sysfs(guest, "run") == 1
    assert unit_state(guest, "ksmtuned.service") == ("enabled", "active")
    assert not guest.testinfra_host().file("/etc/tmpfiles.d/ksm-guard.conf").exists
    assert sysfs(guest, "pages_sharing") >= sharing * 0.9

    forced = ksm_guard("unmerge", "--yes", "--force", "-i", path)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert (sysfs(guest, "pages_shared"), sysfs(guest, "pages_sharing")) == (0, 0)


# 9. Interrupted unmerges ----------------------------------------------------------------------


def _wait_unmerge_started(guest: Guest, timeout: float = 120) -> None:
    """Until run reads 2 while pages are still shared: the write is in progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = guest.ssh(
            "r=$(cat /sys/kernel/mm/ksm/run); s=$(cat /sys/kernel/mm/ksm/pages_sharing);"
            ' [ "$r" = 2 ] && [ "$s" -gt 0 ]',
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.05)
    pytest.fail("the unmerge never started")


def _unmerge_under_way(merged, tmp_path: Path) -> tuple[Guest, str, subprocess.Popen[str]]:
    """A disabled debian guest with 384 MiB merged and `ksm-guard unmerge` in mid-write. The
    host allows an unmerge of up to 0.9 of MemAvailable: 384 MiB is about half of what a 1 GiB
    guest has, and the preflight is not what these tests are about."""
    guest = merged("debian", mib=384)
    name, data = guest.pyinfra_host()
    path = inventory(tmp_path, (name, {**data, "ksm_max_fraction": 0.9}))
    assert ksm_guard("disable", "--yes", "-i", path).returncode == 0
    controller = subprocess.Popen(
        [str(BIN / "ksm-guard"), "unmerge", "--yes", "-i", path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_unmerge_started(guest)
    except BaseException:
        os.killpg(controller.pid, signal.SIGKILL)
        controller.wait(timeout=60)
        raise
    return guest, path, controller


def _wait_counters_zero(guest: Guest, timeout: float = 300) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = (sysfs(guest, "pages_shared"), sysfs(guest, "pages_sharing"))
        if counters == (0, 0):
            return counters
        time.sleep(1)
    return counters


def test_dropped_controller_does_not_stop_the_unmerge(merged, tmp_path: Path) -> None:
    """Killing ksm-guard (and its SSH session) mid-write: the unmerge still completes."""
    guest, _, controller = _unmerge_under_way(merged, tmp_path)
    try:
        os.killpg(controller.pid, signal.SIGKILL)
    finally:
        controller.wait(timeout=60)
    assert _wait_counters_zero(guest) == (0, 0)
    assert sysfs(guest, "run") == 2


def test_rerun_completes_an_interrupted_unmerge(merged, tmp_path: Path) -> None:
    """The writer killed on the host leaves pages merged; running unmerge again completes it."""
    guest, path, controller = _unmerge_under_way(merged, tmp_path)
    try:
        guest.ssh("pkill -KILL -f ksm-guard-unmerge", check=False)
        interrupted = controller.wait(timeout=300)
    finally:
        if controller.poll() is None:
            os.killpg(controller.pid, signal.SIGKILL)
    assert interrupted == 1
    assert sysfs(guest, "pages_sharing") > 0

    rerun = ksm_guard("unmerge", "--yes", "-i", path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (sysfs(guest, "pages_shared"), sysfs(guest, "pages_sharing")) == (0, 0)


# 10. A fleet with a dead host ---------------------------------------------------------------


def test_fleet_with_a_dead_host(fresh_fleet, tmp_path: Path) -> None:
    """All live hosts are disabled; the dead address is unreachable; exit 3."""
    dead = ("dead", {"ssh_hostname": "127.0.0.1", "ssh_port": free_port()})
    path = inventory(tmp_path, *fresh_fleet.values(), extra=(dead,))
    result = ksm_guard("disable", "--yes", "-i", path, "-o", "json")
    hosts = hosts_of(result)
    assert result.returncode == 3
    assert hosts["dead"]["verdict"] == "unreachable"
    assert {name: hosts[g.name]["status"] for name, g in fresh_fleet.items()} == {
        name: "changed" for name in fresh_fleet
    }
    assert [sysfs(g, "run") for g in fresh_fleet.values()] == [0, 0, 0]


def test_rolling_unmerge_stops_at_a_refusal(fresh_fleet, tmp_path: Path) -> None:
    """One host at a time: debian unmerges, pve's preflight refuses, bare is never touched."""
    by_flavour = {guest.flavour: guest for guest in fresh_fleet.values()}
    debian, pve, bare = (by_flavour[flavour] for flavour in ("debian", "pve", "bare"))
    debian.start_workload(64)
    pve.start_workload(64)
    strict = (pve.name, {**pve.pyinfra_host()[1], "ksm_max_fraction": 0.000001})
    path = inventory(tmp_path, debian, strict, bare)
    result = ksm_guard("unmerge", "--yes", "-i", path, "-o", "json")
    hosts = hosts_of(result)
    assert result.returncode == 1, result.stderr
    assert [hosts[g.name]["status"] for g in (debian, pve, bare)] == [
        "changed", "refused", "not-reached",
    ]  # fmt: skip
    assert hosts[debian.name]["unmerge"]["pages"] > 0
    assert (sysfs(debian, "pages_shared"), sysfs(debian, "pages_sharing")) == (0, 0)
    assert sysfs(pve, "run") == 1 and sysfs(pve, "pages_sharing") > 0  # refused: untouched
    assert not bare.testinfra_host().file("/etc/tmpfiles.d/ksm-guard.conf").exists


# ksm-guard verify ----------------------------------------------------------------------------


def test_verify_fails_then_passes_after_disable_and_unmerge(merged, tmp_path: Path) -> None:
    """The shipped testinfra checks fail on a fresh host and pass after disable + unmerge."""
    guest = merged("pve")
    path = inventory(tmp_path, guest)
    before = ksm_guard("verify", "-i", path, "--junit-xml", str(tmp_path / "before.xml"))
    assert before.returncode == 1, before.stdout + before.stderr
    assert ksm_guard("unmerge", "--yes", "-i", path).returncode == 0
    after = ksm_guard("verify", "-i", path, "--junit-xml", str(tmp_path / "after.xml"))
    assert after.returncode == 0, after.stdout + after.stderr
    report = (tmp_path / "after.xml").read_text()
    assert 'failures="0"' in report and 'errors="0"' in report


# Zero pages: where the releases' kernels differ ---------------------------------------------------


def _merge_zero_pages(fresh_guest, mib: int = 64) -> tuple[Guest, int, int]:
    """A bare guest with use_zero_pages=1, ``mib`` MiB of zero pages marked mergeable and ksmd
    running fast; return it, the workload's pid and its page count."""
    guest = fresh_guest("bare")
    # Both releases' kernels default to transparent huge pages "always". With it, 6.12 left
    # ksm_zero_pages at 0 for a zero-filled workload (the THP shrinker new in 6.12 maps zero-filled
    # pieces of underused huge pages to the zero page itself, most likely); madvise gives KSM
    # 4 KiB pages on both releases.
    guest.ssh(
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled;"
        " echo 1 > /sys/kernel/mm/ksm/use_zero_pages"
    )
    pid = guest.launch_workload(mib, fill=0)
    guest.run_ksm_fast()
    page_size = int(guest.testinfra_host().check_output("getconf PAGESIZE"))
    return guest, pid, mib * 1024 * 1024 // page_size


def rss_kib(guest: Guest, pid: int) -> int:
    """The process's VmRSS in KiB, read with testinfra."""
    status = guest.testinfra_host().file(f"/proc/{pid}/status").content_string
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@pytest.mark.releases("trixie")
def test_zero_pages_are_counted_and_unmerged_on_6_12(
    fresh_guest, tmp_path: Path, release: str
) -> None:
    """6.12 counts the zero pages KSM placed (ksm_zero_pages): the audit counts them in the bytes
    an unmerge needs, and unmerge gives every one back (ksm_zero_pages 0)."""
    guest, _, pages = _merge_zero_pages(fresh_guest)
    zero = poll(lambda: sysfs(guest, "ksm_zero_pages"), lambda n: n >= pages * 0.9)
    assert zero >= pages * 0.9
    path = inventory(tmp_path, guest)
    audit = hosts_of(ksm_guard("audit", "-i", path, "-o", "json"))[guest.name]["audit"]
    assert audit["ksm_zero_pages"] >= zero
    assert audit["unmerge_need_bytes"] >= zero * audit["page_size"]
    unmerged = ksm_guard("unmerge", "--yes", "-i", path)
    assert unmerged.returncode == 0, unmerged.stdout + unmerged.stderr
    assert (sysfs(guest, "ksm_zero_pages"), sysfs(guest, "run")) == (0, 2)


@pytest.mark.releases("bookworm")
def test_zero_pages_merged_on_6_1_are_invisible(fresh_guest, tmp_path: Path, release: str) -> None:
    """6.1 maps the zero pages KSM finds to the zero page too (the workload's RSS drops) but counts
    them nowhere (no ksm_zero_pages file): the audit sees nothing merged."""
    guest, pid, pages = _merge_zero_pages(fresh_guest)
    assert not guest.testinfra_host().file("/sys/kernel/mm/ksm/ksm_zero_pages").exists
    half = pages * 4 // 2  # KiB, 4 KiB pages
    assert poll(lambda: rss_kib(guest, pid), lambda kib: kib < half) < half
    audit = hosts_of(ksm_guard("audit", "-i", inventory(tmp_path, guest), "-o", "json"))[
        guest.name
    ]["audit"]
    assert (audit["ksm_zero_pages"], audit["pages_sharing"], audit["unmerge_need_bytes"]) == (
        0, 0, 0,
    )  # fmt: skip
