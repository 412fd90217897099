"""Who shares memory with whom: the cross-VM sharing map of ``audit --vms --sharing``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypedDict

from pyinfra.api import QuoteString, StringCommand
from pyinfra.api.exceptions import FactProcessError

from .model import HostState, SharedWith, Vm

# The scan itself, sent with the command: perl-base is Essential on Debian (and so on Proxmox
# VE), python3 is not. It reads /proc/PID/maps and pagemap of each QEMU process in bulk, then
# /proc/kpageflags and /proc/kpagecount for the PFNs found, in runs (the file says how).
SCAN_SCRIPT = Path(__file__).with_name("sharing_scan.pl").read_text(encoding="utf-8")

USER_CFG = "/etc/pve/user.cfg"
PVE_CONF_DIR = "/etc/pve/qemu-server"
# A tag naming a VM's tenant when no pool does. qemu-server's ``tags`` are a pve-tag-list, each
# tag matching $PVE_TAG_RE ``[a-z0-9_][a-z0-9_\-\+\.]*`` (proxmox/pve-common 0219596da205,
# src/PVE/JSONSchema.pm): no ``=`` or ``:``, hence a prefix.
TENANT_TAG = "tenant-"

_VM_LINE = re.compile(
    r"vm pid=(\d+) (?:error=(.*)|scanned=(\d+) ksm=(\d+) within=(\d+) other=(\d+))"
)
_PAIR_LINE = re.compile(r"pair (\d+) (\d+) (\d+)")
_CPU_LINE = re.compile(r"cpu user=([\d.]+) system=([\d.]+) candidates=(\d+)(?: peak_kib=\d+)?")
_POOL_LINE = re.compile(re.escape(USER_CFG) + r":pool:([^:]+):[^:]*:([^:]*):.*")
_CONF_LINE = re.compile(re.escape(PVE_CONF_DIR) + r"/(\d+)\.conf:(.*)")


class VmScan(TypedDict):
    """What the scan found for one QEMU process (``error`` set: nothing else is)."""

    scanned_pages: int
    ksm_pages: int  # distinct KSM pages it maps
    within_pages: int  # ... that no other process maps
    other_pages: int  # ... that a process other than the VMs maps too
    error: str | None


class Scan(TypedDict):
    """The parsed output of one sharing command."""

    error: str | None  # the whole scan failed (not root, no /proc/kpageflags, no perl)
    vms: dict[int, VmScan]
    pairs: dict[tuple[int, int], int]  # (pid, pid) → distinct shared KSM pages
    cpu_seconds: float
    pools: dict[str, str]  # VMID → pool
    tags: dict[str, list[str]]  # VMID → tags of the config's main section


def sharing_command(page_size: int, pids: list[int]) -> StringCommand:
    """
    The one extra remote command of ``--sharing``: the tenant marks (pool lines of user.cfg; the
    configs' ``tags`` and section headers), then the perl scan of ``pids``. Reads only.
    """
    return StringCommand(
        "echo '## tenants';",
        f"grep -sH '^pool:' {USER_CFG};",
        f"grep -sHE '^(tags:|\\[)' {PVE_CONF_DIR}/*.conf;",
        "echo '## scan';",
        "if command -v perl >/dev/null; then perl -e",
        QuoteString(SCAN_SCRIPT),
        QuoteString(str(page_size)),
        *(QuoteString(str(pid)) for pid in pids),
        "; else echo 'error=no perl on the host'; fi",
    )


def parse_error(line: str) -> FactProcessError:
    return FactProcessError(f"ksm-guard cannot parse a sharing scan line: {line!r}")


def parse_pools(lines: list[str]) -> dict[str, str]:
    """
    The VMs of each pool, by VMID: ``pool:<id>:<comment>:<vmid,...>:<storage,...>:`` lines of
    /etc/pve/user.cfg as pve-access-control writes them (proxmox/pve-access-control 680953712740,
    src/PVE/AccessControl.pm write_user_config; the comment is encode_text'ed, so it holds no
    colon). A VM is in at most one pool.
    """
    pools: dict[str, str] = {}
    for line in lines:
        match = _POOL_LINE.fullmatch(line.rstrip())
        if match is None:
            raise parse_error(line)
        for vmid in filter(None, (item.strip() for item in match.group(2).split(","))):
            pools[vmid] = match.group(1)
    return pools


def parse_tags(lines: list[str]) -> dict[str, list[str]]:
    """
    ``tags:`` of each config's main section by VMID (snapshot and pending sections skipped), split
    at ``;``, ``,`` and white space: a ``-list`` format is split by PVE::Tools::split_list
    (pve-common 0219596da205, src/PVE/JSONSchema.pm check_format).
    """
    tags: dict[str, list[str]] = {}
    main: dict[str, bool] = {}
    for line in lines:
        match = _CONF_LINE.fullmatch(line.rstrip())
        if match is None:
            raise parse_error(line)
        vmid, text = match.groups()
        if text.startswith("["):
            main[vmid] = False
        elif main.get(vmid, True) and text.startswith("tags:"):
            tags[vmid] = [tag for tag in re.split(r"[;,\s]+", text[5:]) if tag]
    return tags


def empty_scan() -> Scan:
    """The scan of a host without running VMs: nothing shared, nothing read."""
    return {"error": None, "vms": {}, "pairs": {}, "cpu_seconds": 0.0, "pools": {}, "tags": {}}


def parse_scan(lines: list[str]) -> Scan:
    """The sharing command's output. Raises FactProcessError on a line it cannot print."""
    scan = empty_scan()
    part = None
    tenant_lines: dict[str, list[str]] = {"pool": [], "conf": []}
    for line in lines:
        if line in ("## tenants", "## scan"):
            part = line[3:]
            continue
        if part == "tenants":
            tenant_lines["pool" if line.startswith(USER_CFG) else "conf"].append(line)
        elif part != "scan":
            raise parse_error(line)
        elif line.startswith("error="):
            scan["error"] = line[6:]
        elif match := _VM_LINE.fullmatch(line):
            pid, error = int(match.group(1)), match.group(2)
            figures = [int(value) for value in match.group(3, 4, 5, 6)] if error is None else []
            scan["vms"][pid] = {
                "scanned_pages": figures[0] if figures else 0,
                "ksm_pages": figures[1] if figures else 0,
                "within_pages": figures[2] if figures else 0,
                "other_pages": figures[3] if figures else 0,
                "error": error,
            }
        elif match := _PAIR_LINE.fullmatch(line):
            first, second, pages = (int(value) for value in match.groups())
            scan["pairs"][(first, second)] = pages
        elif match := _CPU_LINE.fullmatch(line):
            scan["cpu_seconds"] = round(float(match.group(1)) + float(match.group(2)), 3)
        else:
            raise parse_error(line)
    if part != "scan" and scan["error"] is None:
        scan["error"] = "the sharing scan printed nothing"
    scan["pools"] = parse_pools(tenant_lines["pool"])
    scan["tags"] = parse_tags(tenant_lines["conf"])
    return scan


def tenant_of(vmid: str | None, scan: Scan) -> tuple[str | None, str | None]:
    """
    A VM's tenant and where it comes from: its Proxmox VE pool wins; else its first
    ``tenant-<name>`` tag; else none.
    """
    if vmid is None:
        return None, None
    if vmid in scan["pools"]:
        return scan["pools"][vmid], "pool"
    for tag in scan["tags"].get(vmid, []):
        if tag.startswith(TENANT_TAG) and len(tag) > len(TENANT_TAG):
            return tag[len(TENANT_TAG) :], "tag"
    return None, None


def _who(vm: Vm) -> dict[str, Any]:
    return {"pid": vm["pid"], "vmid": vm["vmid"], "name": vm["name"]}


def apply_scan(state: HostState, scan: Scan) -> None:
    """
    Put the map into the host's state: each VM's ``shared_with``, ``shared_with_other_bytes``,
    ``merged_within_bytes``, ``tenant`` (None where the scan could not read it, with
    ``sharing_error``), and the host's ``sharing``: pairs by shared bytes, tenant pairs.
    """
    page = state["page_size"]
    vms = {vm["pid"]: vm for vm in state["vms"]}
    for pid, vm in vms.items():
        found = scan["vms"].get(pid)
        error = scan["error"] or (found["error"] if found else "not scanned")
        tenant, source = tenant_of(vm["vmid"], scan)
        shared: list[SharedWith] = []
        for (first, second), pages in scan["pairs"].items():
            if pid in (first, second):
                other = vms.get(second if pid == first else first)
                if other is not None:
                    shared.append({**_who(other), "bytes": pages * page})  # type: ignore[typeddict-item]
        shared.sort(key=lambda item: (-item["bytes"], item["pid"]))
        vm["shared_with"] = None if error else shared
        vm["shared_with_other_bytes"] = None if error or not found else found["other_pages"] * page
        vm["merged_within_bytes"] = None if error or not found else found["within_pages"] * page
        vm["ksm_mapped_bytes"] = None if error or not found else found["ksm_pages"] * page
        vm["tenant"], vm["tenant_source"] = tenant, source
        vm["sharing_error"] = error
    pairs: list[dict[str, Any]] = [
        {"a": _who(vms[first]), "b": _who(vms[second]), "bytes": pages * page}
        for (first, second), pages in scan["pairs"].items()
        if first in vms and second in vms
    ]
    pairs.sort(key=lambda pair: (-pair["bytes"], pair["a"]["pid"], pair["b"]["pid"]))
    state["sharing"] = {
        "error": scan["error"],
        "pairs": pairs,
        "tenant_pairs": tenant_pairs(pairs, {pid: vm["tenant"] for pid, vm in vms.items()}),
        "scanned_bytes": sum(found["scanned_pages"] for found in scan["vms"].values()) * page,
        "cpu_seconds": scan["cpu_seconds"],
    }


def tenant_pairs(
    pairs: list[dict[str, Any]], tenants: dict[int, str | None]
) -> list[dict[str, Any]]:
    """
    The VM pairs summed per tenant pair (both VMs with a tenant; a pair within one tenant too):
    ``{"a": tenant, "b": tenant, "bytes": sum, "vm_pairs": n}``, most bytes first. A page three
    VMs share counts once in each of their pairs.
    """
    sums: dict[tuple[str, str], list[int]] = {}
    for pair in pairs:
        first, second = tenants.get(pair["a"]["pid"]), tenants.get(pair["b"]["pid"])
        if first is None or second is None:
            continue
        key = (min(first, second), max(first, second))
        total = sums.setdefault(key, [0, 0])
        total[0] += pair["bytes"]
        total[1] += 1
    found = [
        {"a": key[0], "b": key[1], "bytes": total[0], "vm_pairs": total[1]}
        for key, total in sums.items()
    ]
    return sorted(found, key=lambda item: (-item["bytes"], item["a"], item["b"]))


def unreadable(state: HostState, why: str) -> None:
    """The map could not be made on this host: every VM's fields None, the reason given."""
    apply_scan(
        state,
        {"error": why, "vms": {}, "pairs": {}, "cpu_seconds": 0.0, "pools": {}, "tags": {}},
    )
