"""The sharing map over SSH on a VM (``audit --vms --sharing``), against sharing built to be known.

On a bare guest, three processes named ``kvm`` (a copy of python3 running tests/vm/workload.py,
each with a QEMU ``-name``: the audit only looks at QEMU process names) hold 8 MiB of mergeable
pages each: ``twin-a`` and ``twin-b`` the same pages, each page different from every other
(``pages:SEED``), so ksmd merges each page of one with the same page of the other and nothing
else; ``loner`` one byte value in every page, so its pages merge only among themselves. Once
ksmd merged them all, ``run=0`` freezes the pages, then ksm-guard audits the guest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_scenarios import inventory, ksm_guard
from tests.results import hosts_of
from tests.vm.guest import WORKLOAD_TIMEOUT_S, Guest
from tests.vm.session import VmSession

pytestmark = pytest.mark.xdist_group("sharing-vm")

MIB = 8
PAGE = 4096
PAGES = MIB * 1024 * 1024 // PAGE
WORKLOADS = {"twin-a": "pages:7", "twin-b": "pages:7", "loner": "51"}
KVM = "/usr/local/lib/fake-qemu/kvm"  # a copy of python3: the audit knows QEMU by its name


class Scanned:
    """The guest, its workloads' pids by name, and the audit's JSON and table results."""

    def __init__(self, guest: Guest, pids: dict[str, int], inventory: str) -> None:
        self.guest = guest
        self.pids = pids
        self.json = ksm_guard("audit", "--vms", "--sharing", "-i", inventory, "-o", "json")
        self.table = ksm_guard("audit", "--vms", "--sharing", "-i", inventory)

    @property
    def audit(self) -> dict[str, Any]:
        return dict(hosts_of(self.json)[self.guest.name]["audit"])

    def vm(self, name: str) -> dict[str, Any]:
        return next(vm for vm in self.audit["vms"] if vm["pid"] == self.pids[name])


def _start(guest: Guest) -> dict[str, int]:
    """The three workloads, merged by ksmd, then frozen (run=0); their pids by name."""
    guest.ssh(f'mkdir -p {KVM.rpartition("/")[0]} && cp "$(readlink -f /usr/bin/python3)" {KVM}')
    pids = {
        name: guest.launch_workload(MIB, fill, program=KVM, args=f"-name {name}")
        for name, fill in WORKLOADS.items()
    }
    guest.run_ksm_fast()
    # Every page of both twins merged, the loner's nearly all; then ksmd stops and the pages
    # stay as they are.
    merged = " && ".join(
        f'[ "$(cat /proc/{pids[name]}/ksm_merging_pages)" -ge'
        f" {PAGES if fill.startswith('pages:') else PAGES * 9 // 10} ]"
        for name, fill in WORKLOADS.items()
    )
    guest.await_condition(
        f"{merged} && echo 0 > /sys/kernel/mm/ksm/run",
        WORKLOAD_TIMEOUT_S,
        "grep -H . /sys/kernel/mm/ksm/*",
        "the workloads not merged",
    )
    return pids


@pytest.fixture(scope="module")
def scanned(
    vm_session: VmSession, release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scanned]:
    guest = vm_session.start("bare", name=f"share-{release}", release=release)
    try:
        pids = _start(guest)
        path = inventory(tmp_path_factory.mktemp("sharing"), guest)
        yield Scanned(guest, pids, path)
    finally:
        vm_session.release([guest])


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    # Merged pages remain (run=0): exposed, exit 1; nothing on stderr (the map was made).
    assert (result.returncode, result.stderr) == (1, ""), result.stderr


def test_the_audit_made_the_map(scanned: Scanned) -> None:
    """Exit 1 (merged pages remain), no error line, no map error."""
    _ok(scanned.json)
    assert scanned.audit["sharing"].get("error") is None


def test_the_twins_share_every_page_with_each_other(scanned: Scanned) -> None:
    """One pair, the twins, sharing exactly their 8 MiB: one KSM page per page of each."""
    pairs = {
        (frozenset({pair["a"]["pid"], pair["b"]["pid"]}), pair["bytes"])
        for pair in scanned.audit["sharing"]["pairs"]
    }
    twins = frozenset({scanned.pids["twin-a"], scanned.pids["twin-b"]})
    assert pairs == {(twins, PAGES * PAGE)}


@pytest.mark.parametrize(("name", "other"), [("twin-a", "twin-b"), ("twin-b", "twin-a")])
def test_a_twins_shared_with_names_the_other(scanned: Scanned, name: str, other: str) -> None:
    """shared_with: the other twin, by pid and QEMU -name, 8 MiB."""
    assert [
        (peer["pid"], peer["name"], peer["bytes"]) for peer in scanned.vm(name)["shared_with"]
    ] == [(scanned.pids[other], other, PAGES * PAGE)]


@pytest.mark.parametrize("name", ["twin-a", "twin-b"])
def test_a_twin_merged_nothing_within_itself(scanned: Scanned, name: str) -> None:
    """Every KSM page a twin maps, the other maps too."""
    assert scanned.vm(name)["merged_within_bytes"] == 0


def test_the_loner_shares_with_no_vm(scanned: Scanned) -> None:
    """Its pages are one byte value: merged, but with nobody else."""
    assert scanned.vm("loner")["shared_with"] == []


def test_the_loner_merged_within_itself(scanned: Scanned) -> None:
    """Its merged_within_bytes are the KSM pages the kernel counts beyond the twins' 2,048 (a
    handful: max_page_sharing caps each at 256 mappings), read from sysfs with ksmd stopped."""
    shared = int(scanned.guest.ssh("cat /sys/kernel/mm/ksm/pages_shared").stdout)
    assert scanned.vm("loner")["merged_within_bytes"] == (shared - PAGES) * PAGE > 0


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_no_other_process_maps_their_ksm_pages(scanned: Scanned, name: str) -> None:
    """shared_with_other_bytes: 0; only the workloads mark pages mergeable."""
    assert scanned.vm(name)["shared_with_other_bytes"] == 0


def test_the_table_lists_the_twins_pair(scanned: Scanned) -> None:
    """The sharing table: one pair row, the twins, 8.0 MiB."""
    _ok(scanned.table)
    lines = scanned.table.stdout.splitlines()
    start = lines.index("sharing map (distinct physical KSM pages both VMs map):")
    end = lines.index("", start)  # the per-VM table follows
    rows = [line.split() for line in lines[start + 2 : end]]
    assert [(row[0], sorted(row[1:3]), row[3:]) for row in rows] == [
        (scanned.guest.name, ["twin-a", "twin-b"], ["8.0", "MiB"])
    ]
