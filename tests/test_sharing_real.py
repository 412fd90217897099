"""
The sharing map against real QEMU guests on this machine's kernel, checked against the kernel's
own pagemap/kpageflags/kpagecount read here, independently of the perl scan.

Four halted guests (tests/qemuguests.py): two with the same 4 MiB of random data loaded, one
with other random data, one with zero-filled RAM only. ksmd merges them, then stops (run=0).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksm_guard.operations.sharing import SCAN_SCRIPT
from tests.conftest import ksm_guard
from tests.localksm import KSM
from tests.qemuguests import Guest, merged_guests

pytestmark = [
    pytest.mark.realksm,
    pytest.mark.skipif(
        not (KSM / "run").exists() or os.geteuid() != 0,
        reason="needs root and a kernel with KSM (/sys/kernel/mm/ksm)",
    ),
]

PAGE = os.sysconf("SC_PAGE_SIZE")
DATA_MIB = 4
DATA_PAGES = DATA_MIB * 1024 * 1024 // PAGE
KPF_KSM = 21


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Guest]]:
    directory = tmp_path_factory.mktemp("guests")
    same, other = directory / "same.bin", directory / "other.bin"
    same.write_bytes(os.urandom(DATA_MIB << 20))
    other.write_bytes(os.urandom(DATA_MIB << 20))
    specs = [("same1", 32, same), ("same2", 32, same), ("other", 32, other), ("zero", 32, None)]
    with merged_guests(directory, specs) as started:
        yield {guest.name: guest for guest in started}


def _u64s(path: str, offset: int, count: int) -> tuple[int, ...]:
    """``count`` little-endian u64s of a /proc file from entry ``offset`` (fewer at its end)."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset * 8)
        data = handle.read(count * 8)
    return struct.unpack(f"<{len(data) // 8}Q", data)


def kernel_ksm_pages(pid: int) -> Counter[int]:
    """
    Every KSM PFN the process maps (any mapping, any flag but present), with how many of its
    pages map it: pagemap entry bit 63 present, bits 0-54 the PFN; kpageflags bit 21 KSM.
    """
    present: Counter[int] = Counter()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span = line.split()[0].split("-")
        start, end = int(span[0], 16) // PAGE, int(span[1], 16) // PAGE
        for entry in _u64s(f"/proc/{pid}/pagemap", start, end - start):
            if entry >> 63:
                present[entry & ((1 << 55) - 1)] += 1
    with open("/proc/kpageflags", "rb", buffering=0) as flags:
        ksm = set()
        for pfn in present:
            flags.seek(pfn * 8)
            if struct.unpack("<Q", flags.read(8))[0] >> KPF_KSM & 1:
                ksm.add(pfn)
    return Counter({pfn: n for pfn, n in present.items() if pfn in ksm})


@pytest.fixture(scope="module")
def kernel(guests: dict[str, Guest]) -> dict[str, Counter[int]]:
    return {name: kernel_ksm_pages(guest.pid) for name, guest in guests.items()}


@pytest.fixture(scope="module")
def audit(guests: dict[str, Guest]) -> dict[str, object]:
    result = ksm_guard("audit", "--vms", "--sharing", "-o", "json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)["hosts"][0]["audit"]


def _vm(audit: dict, guest: Guest) -> dict:
    return next(vm for vm in audit["vms"] if vm["pid"] == guest.pid)


def _shared(audit: dict, first: Guest, second: Guest) -> int:
    found = [
        item["bytes"] for item in _vm(audit, first)["shared_with"] if item["pid"] == second.pid
    ]
    return found[0] if found else 0


NAMES = ["same1", "same2", "other", "zero"]
PAIRS = [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1 :]]


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_each_pair_shares_what_the_kernel_says(audit, guests, kernel, first, second) -> None:
    """A pair's shared bytes are the distinct KSM PFNs both map, read from the kernel here."""
    expected = len(kernel[first].keys() & kernel[second].keys()) * PAGE
    assert _shared(audit, guests[first], guests[second]) == expected


def test_the_guests_with_the_same_data_share_it(audit, guests) -> None:
    """The loaded data is shared by the two guests that have it, and by no other pair."""
    same = _shared(audit, guests["same1"], guests["same2"])
    firmware = _shared(audit, guests["same1"], guests["other"])
    assert same >= DATA_PAGES * PAGE
    assert firmware < DATA_PAGES * PAGE // 4


@pytest.mark.parametrize("name", NAMES)
def test_merged_within_is_what_only_that_guest_maps(audit, guests, kernel, name) -> None:
    """merged_within_bytes: KSM PFNs mapped more than once, by this guest only (kpagecount)."""
    mine = kernel[name]
    others = set().union(*(kernel[other].keys() for other in NAMES if other != name))
    within = [
        pfn for pfn, n in mine.items()
        if pfn not in others and n >= 2 and _u64s("/proc/kpagecount", pfn, 1)[0] == n
    ]  # fmt: skip
    assert _vm(audit, guests[name])["merged_within_bytes"] == len(within) * PAGE


def test_the_zero_filled_guest_merges_within_itself(audit, guests) -> None:
    """The zero-filled guest's RAM merged mostly into pages only it maps."""
    zero = _vm(audit, guests["zero"])
    assert zero["merged_within_bytes"] > 0
    assert zero["shared_with_other_bytes"] == 0


def test_prometheus_has_a_gauge_per_pair(guests, audit) -> None:
    """-o prometheus --sharing: ksm_guard_vm_pair_shared_bytes for each pair, as in the JSON."""
    result = ksm_guard("audit", "--vms", "--sharing", "-o", "prometheus")
    samples = {
        (s.labels["vmid_a"], s.labels["vmid_b"]): s.value
        for family in text_string_to_metric_families(result.stdout)
        if family.name == "ksm_guard_vm_pair_shared_bytes"
        for s in family.samples
    }
    first, second = guests["same1"].pid, guests["same2"].pid
    key = (f"pid-{min(first, second)}", f"pid-{max(first, second)}")
    assert samples[key] == _shared(audit, guests["same1"], guests["same2"])


def test_table_lists_the_pair_first(guests) -> None:
    """The text table's first pair row is the two guests with the same data."""
    result = ksm_guard("audit", "--vms", "--sharing")
    lines = result.stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.startswith("HOST") and "SHARES WITH" in line
    )
    assert {"same1", "same2"} <= set(lines[header + 1].split())


def test_a_vanished_process_is_named_and_the_rest_mapped(guests, tmp_path) -> None:
    """The scan given a pid that exited: that VM has an error line, the others their figures."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    pids = [str(guests["same1"].pid), str(gone.pid), str(guests["same2"].pid)]
    output = subprocess.run(
        ["perl", "-e", SCAN_SCRIPT, str(PAGE), *pids], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert f"vm pid={gone.pid} error=/proc/{gone.pid}/maps: No such file or directory" in output
    assert any(line.startswith(f"pair {pids[0]} {pids[2]} ") for line in output)


def test_non_root_gets_one_line_and_exit_3(guests, tmp_path) -> None:
    """As nobody: exit 3, one stderr line saying root is needed, the audit itself intact."""
    inventory = tmp_path / "nobody.py"
    inventory.write_text("hosts = [('@local', {'_su_user': 'nobody', '_su_shell': '/bin/sh'})]\n")
    result = ksm_guard("audit", "--vms", "--sharing", "-i", str(inventory), "-o", "json")
    host = json.loads(result.stdout)["hosts"][0]
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        "ksm-guard: @local: ok: no sharing map: needs root (uid 65534; try --sudo): "
        "pagemap hides PFNs"
    ]
    assert host["audit"]["sharing"]["pairs"] == []
    assert {vm["pid"] for vm in host["audit"]["vms"]} >= {g.pid for g in guests.values()}
