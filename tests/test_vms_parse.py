"""The VM parsers: Proxmox VE configs, ksm_stat across kernels, versions, garbage."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from pyinfra.api.exceptions import FactProcessError

from ksm_guard.operations.facts import KSM_HOST_COMMAND
from ksm_guard.operations.report import allow_ksm_supported
from ksm_guard.operations.vms import (
    parse_cmdline,
    parse_ksm_stat,
    parse_pve_config,
    parse_qemu_server,
    parse_vms,
)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["name: web1"], {"name": "web1", "allow_ksm": True}),
        (["allow-ksm: 0", "name: db"],
         {"name": "db", "allow_ksm": False}),
        # a snapshot's allow-ksm and name belong to the snapshot, not the VM
        (["name: a", "[pre-upgrade]", "allow-ksm: 0", "name: b"],
         {"name": "a", "allow_ksm": True}),
        # set while running: qemu-server keeps it in [PENDING] until the next start
        (["name: a", "[PENDING]", "allow-ksm: 0"],
         {"name": "a", "allow_ksm": False}),
        (["allow-ksm: 0", "[PENDING]", "delete: allow-ksm,net1"],
         {"name": None, "allow_ksm": True}),
        (["allow-ksm: 1", "[special:cloudinit]", "allow-ksm: 0"],
         {"name": None, "allow_ksm": True}),
    ],
)  # fmt: skip
def test_pve_config(lines: list[str], expected: dict[str, object]) -> None:
    """Only the main section and [PENDING] decide name and allow-ksm."""
    assert parse_pve_config(lines) == expected


@pytest.mark.parametrize(
    ("lines", "merging"),
    [
        (["ksm_rmap_items 310"], None),  # 6.1
        (["ksm_rmap_items 310", "ksm_zero_pages 4", "ksm_merging_pages 300",
          "ksm_process_profit 1200000"], 300),
        (["ksm_rmap_items 310", "ksm_zero_pages 4", "ksm_merging_pages 300",
          "ksm_process_profit -8192", "ksm_merge_any: no", "ksm_mergeable: yes"], 300),  # 6.8+
    ],
)  # fmt: skip
def test_ksm_stat_of_several_kernels(lines: list[str], merging: int | None) -> None:
    """Each kernel's ksm_stat parses; only newer ones carry ksm_merging_pages."""
    stat = parse_ksm_stat(lines)
    assert stat.get("ksm_merging_pages") == merging
    assert stat["ksm_rmap_items"] == 310


@pytest.mark.parametrize(
    ("version", "supported"),
    [("9.0.26", False), ("9.0.27", True), ("9.1.0+pve1", True), ("1:10.0", True),
     ("8.4.14", False), (None, False)],
)  # fmt: skip
def test_allow_ksm_needs_qemu_server_9_0_27(version: str | None, supported: bool) -> None:
    """allow-ksm exists from qemu-server 9.0.27 on."""
    assert allow_ksm_supported(version) is supported


@pytest.mark.parametrize(
    ("value", "version"),
    [("", None), ("ii |9.0.27", "9.0.27"), ("rc |8.0.1", None), ("un |", None),
     ("iiR|9.0.30", "9.0.30")],
)  # fmt: skip
def test_qemu_server_package_state(value: str, version: str | None) -> None:
    """Only an installed qemu-server has a version."""
    assert parse_qemu_server(value, f"qemu_server={value}") == version


def test_machine_mem_merge_off_and_name_escapes() -> None:
    """-machine ...,mem-merge=off turns merging off; ',,' in -name is a comma."""
    found = parse_cmdline(
        ["/usr/bin/kvm", "-name", "a,,b,debug-threads=on", "-M", "q35,mem-merge=off"]
    )
    assert found == {"name": "a,b", "uuid": None, "mem_merge": False}


def test_vm_gone_between_listing_and_reading_is_dropped() -> None:
    """A listed process with an empty cmdline and no counters (it exited) is not a VM."""
    vms, _ = parse_vms(
        ["/var/run/qemu-server/100.pid:77", "/proc/77/comm:kvm", "/proc/77/cmdline:"], 4096
    )
    assert vms == []


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("/proc/12/environ:x", "environ"),
        ("/proc/12/ksm_merging_pages:many", "many"),
        ("/var/run/qemu-server/100.pid:abc", "abc"),
        ("/etc/pve/qemu-server/100.conf:allow-ksm: maybe", "maybe"),
        ("/etc/pve/qemu-server/100.conf:garbage", "garbage"),
        ("/proc/12/ksm_stat:Ksm Stuff", "Ksm Stuff"),
    ],
)
def test_garbage_raises_naming_the_line(line: str, named: str) -> None:
    """Each kind of garbage in the VM section raises FactProcessError quoting the line."""
    lines = ["/proc/12/comm:kvm", "/proc/12/cmdline:/usr/bin/kvm\t", line]
    with pytest.raises(FactProcessError, match=named):
        parse_vms(lines, 4096)


def test_bad_package_state_raises() -> None:
    """A qemu_server line that is not dpkg-query's format is garbage."""
    with pytest.raises(FactProcessError, match="installed"):
        parse_qemu_server("installed", "qemu_server=installed")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as nobody")
def test_command_succeeds_when_vm_counters_are_unreadable(tmp_path) -> None:
    """Run as nobody beside a root-owned kvm process: the fact command still exits 0."""
    kvm = tmp_path / "kvm"
    shutil.copy("/bin/sleep", kvm)
    proc = subprocess.Popen([str(kvm), "30"])
    try:
        time.sleep(0.2)
        result = subprocess.run(
            ["su", "nobody", "-s", "/bin/sh", "-c", KSM_HOST_COMMAND],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 0, result.stderr
    assert f"/proc/{proc.pid}/comm:kvm" in result.stdout.splitlines()
