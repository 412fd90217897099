"""Prove the VM harness itself: flavours, users, KSM workload, reboot and inventories."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import Guest
from tests.vm.inventory import unreachable_host, write_inventory
from tests.vm.recipe import FLAVOURS

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


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_root_logs_in_with_the_suite_key(fleet: dict[str, Guest], flavour: str) -> None:
    """root logs in with the suite's key (testinfra over paramiko)."""
    assert fleet[flavour].testinfra_host().check_output("id -un") == "root"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_openssh_client_reaches_guest(fleet: dict[str, Guest], flavour: str) -> None:
    """Guest.ssh reaches the guest through the OpenSSH client."""
    assert fleet[flavour].ssh("hostname").stdout.strip() == "ksm-guard-test"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_ksm_sysfs_exists(fleet: dict[str, Guest], flavour: str) -> None:
    """The guest kernel has KSM."""
    assert fleet[flavour].testinfra_host().file(KSM_RUN).exists


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


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_admin_has_passwordless_sudo(fleet: dict[str, Guest], flavour: str) -> None:
    """admin may sudo without a password."""
    assert fleet[flavour].testinfra_host("admin").run("sudo -n true").rc == 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_nosudo_has_no_sudo(fleet: dict[str, Guest], flavour: str) -> None:
    """nosudo may not sudo."""
    assert fleet[flavour].testinfra_host("nosudo").run("sudo -n true").rc != 0


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


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_workload_gets_merged(fresh_guest: FreshGuest, flavour: str) -> None:
    """The workload's pages get merged by KSM."""
    guest = fresh_guest(flavour)
    guest.start_workload(mib=64)
    sharing = guest.testinfra_host().file("/sys/kernel/mm/ksm/pages_sharing").content_string
    assert int(sharing) > 0


def test_reboot_changes_boot_id(fresh_guest: FreshGuest) -> None:
    """Guest.reboot really reboots: the boot_id changes (debian reboots in test_scenarios.py)."""
    guest = fresh_guest("pve")
    before = guest.boot_id()
    guest.reboot()
    boot_id = guest.testinfra_host().file("/proc/sys/kernel/random/boot_id").content_string
    assert boot_id.strip() != before
