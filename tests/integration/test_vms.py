"""Per-VM exposure and vm-optout on a pve guest dressed as a Proxmox VE node at test time.

The layout is set up over SSH (the image recipe stays as it is): a process named ``kvm`` (a copy
of python3 running tests/vm/workload.py) holds identical MADV_MERGEABLE pages, its pid in
/var/run/qemu-server/100.pid; /etc/pve/qemu-server/100.conf names it (no allow-ksm) and 101.conf
is a stopped VM with ``allow-ksm: 0``. ``qm`` is a STAND-IN (tests/integration/qm_stand_in.py):
Proxmox VE cannot be installed here. Dummy ``qemu-server`` packages built with dpkg-deb make the
guest report a qemu-server version. One guest serves every test of this module, in order, on
Debian 13; the audit of VM 100 and its ksm_stat fields run on a Debian 12 node as well.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BIN
from tests.integration.test_scenarios import ROOT, ksm_guard
from tests.results import hosts_of
from tests.vm.guest import WORKLOAD_SCRIPT, WORKLOAD_TIMEOUT_S, Guest
from tests.vm.inventory import write_inventory
from tests.vm.recipe import RELEASES
from tests.vm.session import VmSession

pytestmark = pytest.mark.xdist_group("pve-node")  # one node, its tests in order

QM_STAND_IN = Path(__file__).with_name("qm_stand_in.py")
CONF_100 = "name: web1\nmemory: 1024\n\n[before-upgrade]\nallow-ksm: 0\nname: web1-old\n"
CONF_101 = "name: db1\nallow-ksm: 0\nmemory: 512\n"
MIB = 64

SETUP = f"""
set -e
mkdir -p /usr/local/lib/fake-pve /var/run/qemu-server /etc/pve/qemu-server
cp "$(readlink -f /usr/bin/python3)" /usr/local/lib/fake-pve/kvm
printf '%s' '{CONF_100}' > /etc/pve/qemu-server/100.conf
printf '%s' '{CONF_101}' > /etc/pve/qemu-server/101.conf
: > /var/log/qm-stand-in.log
"""


def _package(guest: Guest, version: str) -> None:
    """Build and install a dummy qemu-server package of ``version`` on the guest."""
    guest.ssh(
        f"""set -e; d=$(mktemp -d); mkdir "$d/DEBIAN"
cat > "$d/DEBIAN/control" <<EOT
Package: qemu-server
Version: {version}
Architecture: all
Maintainer: ksm-guard tests <tests@localhost>
Description: dummy stand-in so that dpkg reports qemu-server {version} (ksm-guard tests)
EOT
dpkg-deb --root-owner-group --build "$d" /tmp/qemu-server.deb >/dev/null
dpkg -i /tmp/qemu-server.deb >/dev/null; rm -rf "$d" /tmp/qemu-server.deb"""
    )


@pytest.fixture(scope="module")
def node(vm_session: VmSession, release: str) -> Iterator[Guest]:
    """A pve guest with the Proxmox-like layout and VM 100's pages merged (ksmtuned: run=1)."""
    guest = vm_session.start("pve", name=f"pve-vms-{release}", release=release)
    try:
        guest.ssh(SETUP)
        guest.ssh("cat > /usr/sbin/qm && chmod 755 /usr/sbin/qm", input=QM_STAND_IN.read_text())
        guest.ssh("cat > /var/tmp/workload.py", input=WORKLOAD_SCRIPT.read_text())
        # After the workload's own arguments (size, pid file, lifetime), the -id and -pidfile
        # qemu-server gives a VM (QemuServer.pm config_to_command): qemu-server, and ksm-guard,
        # know a VM's process by the -pidfile it was started with.
        guest.ssh(
            "cd /; nohup setsid /usr/local/lib/fake-pve/kvm /var/tmp/workload.py"
            f" {MIB} /var/run/qemu-server/100.pid 3600 -id 100"
            " -pidfile /var/run/qemu-server/100.pid >/var/tmp/kvm.log 2>&1 </dev/null &"
        )
        pages = MIB * 1024 * 1024 // 4096
        guest.await_condition(
            "grep -qx ready /var/tmp/kvm.log && p=$(cat /var/run/qemu-server/100.pid) &&"
            f" [ $(cat /proc/$p/ksm_merging_pages) -ge {pages * 9 // 10} ]",
            WORKLOAD_TIMEOUT_S,
            "cat /var/tmp/kvm.log",
            "VM 100 not merged",
        )
        yield guest
    finally:
        vm_session.release([guest])


@pytest.fixture(scope="module")
def inv(node: Guest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The inventory of the one node."""
    return str(write_inventory(tmp_path_factory.mktemp("vms") / "vms.py", [node]))


def kvm_pid(node: Guest) -> int:
    """VM 100's pid, read from its pid file."""
    return int(node.ssh("cat /var/run/qemu-server/100.pid").stdout)


def proc_merged_bytes(node: Guest, pid: int) -> int:
    """/proc/PID/ksm_merging_pages times the page size, read over SSH, not through ksm-guard."""
    pages, size = node.ssh(f"cat /proc/{pid}/ksm_merging_pages; getconf PAGESIZE").stdout.split()
    return int(pages) * int(size)


def conf(node: Guest, vmid: int) -> str:
    """A VM config as the guest has it."""
    return str(node.testinfra_host().file(f"/etc/pve/qemu-server/{vmid}.conf").content_string)


def qm_calls(node: Guest) -> list[str]:
    """Each call the qm stand-in logged."""
    return node.ssh("cat /var/log/qm-stand-in.log").stdout.splitlines()


def vms_of(result: subprocess.CompletedProcess[str], node: Guest) -> dict[str, dict[str, Any]]:
    """The JSON result's running VMs of ``node`` by VMID (or pid)."""
    return {vm["vmid"] or str(vm["pid"]): vm for vm in hosts_of(result)[node.name]["audit"]["vms"]}


@pytest.mark.releases(*RELEASES)
def test_audit_shows_vm_100_merged_bytes(node: Guest, inv: str) -> None:
    """VM 100's merged bytes match /proc/PID/ksm_merging_pages; name from its config."""
    pid = kvm_pid(node)
    result = ksm_guard("audit", "-i", inv, "-o", "json")
    assert result.returncode == 1, result.stderr
    vm = vms_of(result, node)["100"]
    expected = proc_merged_bytes(node, pid)
    assert vm["pid"] == pid
    assert vm["merged_bytes"] > 0
    assert abs(vm["merged_bytes"] - expected) <= expected // 50  # ksmd may still be scanning
    assert (vm["name"], vm["allow_ksm"], vm["restart_pending"]) == ("web1", True, False)
    assert "101" not in vms_of(result, node)  # configured, not running

    table = ksm_guard("audit", "-i", inv, "--vms")
    rows = [line.split() for line in table.stdout.splitlines()]
    row = next(words for words in rows if words[:2] == [node.name, "100"])
    assert row[2:4] == ["web1", str(pid)] and row[-2:] == ["yes", "no"]

    metrics = ksm_guard("audit", "-i", inv, "-o", "prometheus")
    samples = {
        (s.name, s.labels.get("vmid")): s.value
        for family in text_string_to_metric_families(metrics.stdout)
        for s in family.samples
    }
    assert samples[("ksm_guard_vm_merged_bytes", "100")] > 0
    assert samples[("ksm_guard_run", None)] == 1


# /proc/PID/ksm_stat as fs/proc/base.c proc_pid_ksm_stat prints it on each release's kernel.
KSM_STAT_FIELDS = {
    "bookworm": ("ksm_rmap_items",),
    "trixie": ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit"),
}


@pytest.mark.releases(*RELEASES)
def test_vm_100_ksm_stat_follows_the_kernel(node: Guest, inv: str, release: str) -> None:
    """/proc/PID/ksm_stat has the release kernel's fields; the audit's per-VM ksm_zero_pages
    comes from it where the kernel has it (6.12: a number) and is None where not (6.1)."""
    pid = kvm_pid(node)
    lines = node.ssh(f"cat /proc/{pid}/ksm_stat 2>/dev/null || true").stdout.splitlines()
    stat = dict(line.split(maxsplit=1) for line in lines if line.strip())
    assert tuple(stat) == KSM_STAT_FIELDS[release]
    vm = vms_of(ksm_guard("audit", "-i", inv, "-o", "json"), node)["100"]
    zero = stat.get("ksm_zero_pages")
    assert vm["ksm_zero_pages"] == (None if zero is None else int(zero))


def test_vm_optout_refused_off_proxmox_and_on_old_qemu_server(node: Guest, inv: str) -> None:
    """No qemu-server, then qemu-server 8.4.1: refused with the reason; nothing touched."""
    before = conf(node, 100)
    absent = ksm_guard("vm-optout", "--yes", "-i", inv, "-o", "json")
    assert absent.returncode == 1
    assert hosts_of(absent)[node.name]["detail"].startswith(
        "vm-optout not supported: not a Proxmox VE host"
    )

    _package(node, "8.4.1")
    old = ksm_guard("vm-optout", "--yes", "-i", inv, "-o", "json")
    assert old.returncode == 1
    assert "qemu-server 8.4.1 has no allow-ksm (needs 9.0.27" in hosts_of(old)[node.name]["detail"]
    assert (conf(node, 100), qm_calls(node)) == (before, [])


def test_vm_optout_cli_dry_run_change_and_rerun(node: Guest, inv: str) -> None:
    """9.0.27: the dry run shows VM 100's diff; the run sets allow-ksm 0 pending, keeps the VM
    running and says it needs a stop/start; a rerun changes nothing."""
    _package(node, "9.0.27")
    pid = kvm_pid(node)
    dry = ksm_guard("vm-optout", "--dry-run", "-i", inv, "-o", "json")
    host = hosts_of(dry)[node.name]
    assert (dry.returncode, host["status"]) == (0, "would-change"), dry.stderr
    assert host["changes"] == ["VM 100 (web1): allow-ksm 1 → 0; runs with KSM until a stop/start"]
    assert qm_calls(node) == []

    done = ksm_guard("vm-optout", "--yes", "-i", inv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{node.name}: stop/start VM 100 for allow-ksm to apply" in done.stdout
    assert qm_calls(node) == ["set 100 --allow-ksm 0"]  # 101 already had allow-ksm 0
    assert conf(node, 100).startswith("name: web1\nmemory: 1024\n\n[PENDING]\nallow-ksm: 0\n")
    assert kvm_pid(node) == pid and node.testinfra_host().file(f"/proc/{pid}").exists

    again = ksm_guard("vm-optout", "--yes", "-i", inv, "-o", "json")
    host = hosts_of(again)[node.name]
    assert (again.returncode, host["status"], host["changes"]) == (0, "ok", [])
    vm = vms_of(again, node)["100"]
    assert (vm["allow_ksm"], vm["mem_merge"], vm["restart_pending"]) == (False, True, True)
    assert qm_calls(node) == ["set 100 --allow-ksm 0"]


def test_vm_optout_from_pyinfra_deploy(node: Guest, inv: str) -> None:
    """`pyinfra INV deploy.py --data ksm_mode=vm-optout`: --dry shows the diff, then it applies."""
    node.ssh(
        f"printf '%s' '{CONF_100}' > /etc/pve/qemu-server/100.conf; : > /var/log/qm-stand-in.log"
    )

    def deploy(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "pyinfra"), inv, "deploy.py", *args, "--data", "ksm_mode=vm-optout",
             "--data", "ksm_vmids=100"],
            capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
        )  # fmt: skip

    dry = deploy("--dry")
    assert dry.returncode == 0, dry.stderr
    assert "VM 100 (web1): allow-ksm 1 → 0" in dry.stdout + dry.stderr
    assert qm_calls(node) == []
    applied = deploy("-y")
    assert applied.returncode == 0, applied.stderr
    assert qm_calls(node) == ["set 100 --allow-ksm 0"]
    assert "[PENDING]\nallow-ksm: 0" in conf(node, 100)


def test_strict_policy_names_the_vm_still_running_with_ksm(node: Guest, inv: str) -> None:
    """--policy strict on the node (qemu-server 9.0.27, VM 100 opted out but running): KSM-6
    fails beside the host controls; host policy does not look at VMs."""
    strict = hosts_of(ksm_guard("audit", "--policy", "strict", "-i", inv, "-o", "json"))
    audit = strict[node.name]["audit"]
    assert audit["per_vm_rule"] == "applied"
    assert {"KSM-1", "KSM-2", "KSM-3", "KSM-6"} <= set(audit["failed_controls"])
    assert "KSM-5" not in audit["failed_controls"]  # 100 (pending) and 101 have allow-ksm 0
    host = hosts_of(ksm_guard("audit", "-i", inv, "-o", "json"))[node.name]["audit"]
    assert {c["id"]: c["result"] for c in host["controls"]}["KSM-6"] == "skip"


def test_a_waived_node_is_left_as_it_is(node: Guest, tmp_path: Path) -> None:
    """ksm_waiver in host data: disable and deploy.py leave the node merging (waived, exit 0)."""
    waiver = {"reason": "ksm-guard VM test", "approved_by": "tests", "expires": "2099-12-31"}
    name, data = node.pyinfra_host()
    path = tmp_path / "waived.py"
    path.write_text(f"hosts = [({name!r}, {{**{data!r}, 'ksm_waiver': {waiver!r}}})]\n")
    result = ksm_guard("disable", "--yes", "-i", str(path), "-o", "json")
    host = hosts_of(result)[name]
    assert (result.returncode, host["status"], host["verdict"]) == (0, "waived", "waived")
    deploy = subprocess.run(
        [str(BIN / "pyinfra"), "-y", str(path), "deploy.py", "--data", "ksm_mode=disable"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "waived until 2099-12-31" in deploy.stdout + deploy.stderr
    assert node.testinfra_host().file("/sys/kernel/mm/ksm/run").content_string.strip() == "1"
    state = node.testinfra_host().service("ksmtuned.service").systemd_properties
    assert (state["UnitFileState"], state["ActiveState"]) == ("enabled", "active")


def test_unmerge_brings_vm_100_to_zero(node: Guest, inv: str) -> None:
    """After ksm-guard unmerge, VM 100 reads 0 merged bytes, in the audit and in /proc."""
    result = ksm_guard("unmerge", "--yes", "-i", inv, "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert vms_of(result, node)["100"]["merged_bytes"] == 0
    assert proc_merged_bytes(node, kvm_pid(node)) == 0
