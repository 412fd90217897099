"""Prove the VM harness itself: releases, flavours, users, KSM workload, reboot and inventories.

The flavours' KSM layout (packages, units) and what differs between the releases (os-release,
kernel, systemd, the kernel's KSM files, the ksmtuned package, systemctl show) are checked on both
releases' fleets. Logins, users, clock, pyinfra reach, workload and reboot are checked on the
primary release: the recipe steps behind them are the same for both, and the scenarios log in,
merge and reboot on both.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import Guest
from tests.vm.inventory import unreachable_host, write_inventory
from tests.vm.recipe import FLAVOURS, PRIMARY_RELEASE, RELEASES

pytestmark = pytest.mark.releases(*RELEASES)

FreshGuest = Callable[..., Guest]  # the ``fresh_guest`` fixture (see conftest.py)
KSM_RUN = "/sys/kernel/mm/ksm/run"
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))

# Which package provides ksmtuned on each flavour (None: no ksmtuned at all).
PACKAGES = [
    ("debian", "ksmtuned", True),
    ("debian", "ksm-control-daemon", False),
    ("pve", "ksmtuned", False),
    ("pve", "ksm-control-daemon", True),
    ("bare", "ksmtuned", False),
    ("bare", "ksm-control-daemon", False),
]


def load_state(guest: Guest, unit: str) -> str:
    """Return systemd's LoadState of ``unit`` (testinfra's ``exists`` lists all unit files)."""
    return str(guest.testinfra_host().service(unit).systemd_properties["LoadState"])


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_root_logs_in_with_the_suite_key(fleet: dict[str, Guest], flavour: str) -> None:
    """root logs in with the suite's key (testinfra over paramiko)."""
    assert fleet[flavour].testinfra_host().check_output("id -un") == "root"


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_openssh_client_reaches_guest(fleet: dict[str, Guest], flavour: str) -> None:
    """Guest.ssh reaches the guest through the OpenSSH client."""
    assert fleet[flavour].ssh("hostname").stdout.strip() == "ksm-guard-test"


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ksm_sysfs_exists(fleet: dict[str, Guest], flavour: str) -> None:
    """The guest kernel has KSM."""
    assert fleet[flavour].testinfra_host().file(KSM_RUN).exists


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_restored_guest_clock_is_current(fleet: dict[str, Guest], flavour: str) -> None:
    """A guest restored from the snapshot has its clock reset to now."""
    guest_epoch = int(fleet[flavour].testinfra_host().check_output("date +%s"))
    assert abs(guest_epoch - time.time()) < 30


@pytest.mark.parametrize(("flavour", "package", "installed"), PACKAGES)
def test_ksmtuned_package_per_flavour(
    fleet: dict[str, Guest], flavour: str, package: str, installed: bool
) -> None:
    """Each flavour has its own ksmtuned package (or none)."""
    assert fleet[flavour].testinfra_host().package(package).is_installed is installed


@pytest.mark.parametrize("unit", ["ksm.service", "ksmtuned.service"])
def test_debian_units_enabled(fleet: dict[str, Guest], unit: str) -> None:
    """debian: both of Debian's units are enabled."""
    assert fleet["debian"].testinfra_host().service(unit).is_enabled


def test_debian_ksmtuned_running(fleet: dict[str, Guest]) -> None:
    """debian: ksmtuned runs."""
    assert fleet["debian"].testinfra_host().service("ksmtuned.service").is_running


def test_pve_has_no_ksm_service(fleet: dict[str, Guest]) -> None:
    """pve: there is no ksm.service at all."""
    assert load_state(fleet["pve"], "ksm.service") == "not-found"


def test_pve_ksmtuned_unit_is_in_usr_lib(fleet: dict[str, Guest]) -> None:
    """pve: the unit lives where a package puts it."""
    unit = fleet["pve"].testinfra_host().file("/usr/lib/systemd/system/ksmtuned.service")
    assert unit.is_file


def test_pve_ksmtuned_enabled(fleet: dict[str, Guest]) -> None:
    """pve: ksmtuned.service is enabled."""
    assert fleet["pve"].testinfra_host().service("ksmtuned.service").is_enabled


def test_pve_ksmtuned_running(fleet: dict[str, Guest]) -> None:
    """pve: ksmtuned runs."""
    assert fleet["pve"].testinfra_host().service("ksmtuned.service").is_running


def test_pve_ksmtuned_has_no_exec_stop(fleet: dict[str, Guest]) -> None:
    """pve: stopping ksmtuned leaves run as it is (no ExecStop)."""
    host = fleet["pve"].testinfra_host()
    assert "ExecStop" not in host.check_output("systemctl cat ksmtuned.service")


def test_pve_ksmtuned_switched_ksm_on(fleet: dict[str, Guest]) -> None:
    """pve: ksmtuned has switched KSM on, as on a busy Proxmox node."""
    assert fleet["pve"].testinfra_host().file(KSM_RUN).content_string.strip() == "1"


@pytest.mark.parametrize("unit", ["ksm.service", "ksmtuned.service"])
def test_bare_has_no_ksm_units(fleet: dict[str, Guest], unit: str) -> None:
    """bare: no KSM unit is known to systemd."""
    assert load_state(fleet["bare"], unit) == "not-found"


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_admin_has_passwordless_sudo(fleet: dict[str, Guest], flavour: str) -> None:
    """admin may sudo without a password."""
    assert fleet[flavour].testinfra_host("admin").run("sudo -n true").rc == 0


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_nosudo_has_no_sudo(fleet: dict[str, Guest], flavour: str) -> None:
    """nosudo may not sudo."""
    assert fleet[flavour].testinfra_host("nosudo").run("sudo -n true").rc != 0


@pytest.mark.releases(PRIMARY_RELEASE)
def test_pyinfra_inventory_reaches_every_guest_and_user(
    fleet: dict[str, Guest], tmp_path: Path
) -> None:
    """pyinfra runs a command on every guest as root and as admin with sudo."""
    entries = [g.pyinfra_host() for g in fleet.values()]
    entries += [g.pyinfra_host("admin", sudo=True) for g in fleet.values()]
    inventory = write_inventory(tmp_path / "inventory.py", entries)
    proc = subprocess.run(
        [PYINFRA, "-y", str(inventory), "exec", "--", "id -u"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.releases(PRIMARY_RELEASE)
def test_pyinfra_reports_the_dead_host(fleet: dict[str, Guest], tmp_path: Path) -> None:
    """pyinfra fails on the unreachable entry and names it."""
    inventory = write_inventory(
        tmp_path / "inventory.py", [fleet["bare"]], extra_hosts=[unreachable_host("dead")]
    )
    proc = subprocess.run(
        [PYINFRA, "-y", str(inventory), "exec", "--", "true"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0 and "dead" in proc.stdout + proc.stderr


@pytest.mark.releases(PRIMARY_RELEASE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_workload_gets_merged(fresh_guest: FreshGuest, flavour: str) -> None:
    """The workload's pages get merged by KSM."""
    guest = fresh_guest(flavour)
    guest.start_workload(mib=64)
    sharing = guest.testinfra_host().file("/sys/kernel/mm/ksm/pages_sharing").content_string
    assert int(sharing) > 0


# What differs between the releases ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReleaseFacts:
    """What a release's guests show, as Debian ships it."""

    version_id: str  # /etc/os-release VERSION_ID
    kernel: str  # the start of ``uname -r``
    systemd: int  # ``systemctl --version``
    ksm_files: frozenset[str]  # /sys/kernel/mm/ksm/*


# /sys/kernel/mm/ksm on Debian 12's 6.1: the files mm/ksm.c's ksm_attrs has had since 4.13.
KSM_FILES_6_1 = frozenset(
    {
        "full_scans", "max_page_sharing", "merge_across_nodes", "pages_shared", "pages_sharing",
        "pages_to_scan", "pages_unshared", "pages_volatile", "run", "sleep_millisecs",
        "stable_node_chains", "stable_node_chains_prune_millisecs", "stable_node_dups",
        "use_zero_pages",
    }
)  # fmt: skip
# Debian 13's 6.12: ksm_attrs gained general_profit, ksm_zero_pages, pages_scanned, smart_scan
# with its pages_skipped, and the scan-time advisor's five knobs between 6.1 and 6.12 (the same
# 24 files as this machine's 6.18, tests/facts/facts.KsmHost/evidence_captured.yaml).
KSM_FILES_6_12 = KSM_FILES_6_1 | {
    "general_profit", "ksm_zero_pages", "pages_scanned", "pages_skipped", "smart_scan",
    "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
}  # fmt: skip
RELEASE_FACTS = {
    "bookworm": ReleaseFacts("12", "6.1.", 252, KSM_FILES_6_1),
    "trixie": ReleaseFacts("13", "6.12.", 257, KSM_FILES_6_12),
}


def test_guest_is_its_release(fleet: dict[str, Guest], release: str) -> None:
    """/etc/os-release names the release and its version."""
    os_release = fleet["bare"].testinfra_host().file("/etc/os-release").content_string
    fields = dict(line.split("=", 1) for line in os_release.splitlines() if "=" in line)
    assert (fields["VERSION_CODENAME"], fields["VERSION_ID"].strip('"')) == (
        release,
        RELEASE_FACTS[release].version_id,
    )


def test_guest_kernel_is_the_release_kernel(fleet: dict[str, Guest], release: str) -> None:
    """The guest runs the release's kernel (6.1 on bookworm, 6.12 on trixie)."""
    kernel = fleet["bare"].testinfra_host().check_output("uname -r")
    assert kernel.startswith(RELEASE_FACTS[release].kernel)


def test_guest_systemd_is_the_release_systemd(fleet: dict[str, Guest], release: str) -> None:
    """The guest runs the release's systemd (252 on bookworm, 257 on trixie)."""
    first = fleet["bare"].testinfra_host().check_output("systemctl --version").splitlines()[0]
    assert first.split()[:2] == ["systemd", str(RELEASE_FACTS[release].systemd)]


def test_kernel_ksm_files_are_the_release_kernel_s(fleet: dict[str, Guest], release: str) -> None:
    """/sys/kernel/mm/ksm holds exactly the files of the release's kernel."""
    names = fleet["bare"].testinfra_host().check_output("ls /sys/kernel/mm/ksm").split()
    assert frozenset(names) == RELEASE_FACTS[release].ksm_files


# Debian's ksmtuned: the same two units on both releases (identical files), moved from /lib to
# /usr/lib by 4.20150326+nmu1 in trixie ("Install systemd units into /usr", Debian #1073659).
KSMTUNED_UNIT_DIRS = {"bookworm": "/lib/systemd/system", "trixie": "/usr/lib/systemd/system"}


def test_debian_ksmtuned_ships_both_units(fleet: dict[str, Guest], release: str) -> None:
    """debian: the ksmtuned package ships ksm.service and ksmtuned.service, where the release
    puts packaged units."""
    files = fleet["debian"].testinfra_host().check_output("dpkg -L ksmtuned").splitlines()
    units = sorted(path for path in files if path.endswith(".service"))
    directory = KSMTUNED_UNIT_DIRS[release]
    assert units == [f"{directory}/ksm.service", f"{directory}/ksmtuned.service"]


def test_systemctl_show_reads_alike(fleet: dict[str, Guest]) -> None:
    """The fact command's ``systemctl show`` prints the same lines on systemd 252 and 257: on pve,
    ksmtuned.service loaded and running, ksm.service not found."""
    out = (
        fleet["pve"]
        .ssh(
            "systemctl show --property=Id,LoadState,ActiveState,UnitFileState"
            " ksmtuned.service ksm.service"
        )
        .stdout
    )
    assert out.splitlines() == [
        "Id=ksmtuned.service", "LoadState=loaded", "ActiveState=active", "UnitFileState=enabled",
        "",
        "Id=ksm.service", "LoadState=not-found", "ActiveState=inactive", "UnitFileState=",
    ]  # fmt: skip
