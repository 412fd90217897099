"""The KSM picture of one host, gathered in a single remote command."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast, get_args

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from .cluster import CLUSTER_COMMAND, parse_cluster
from .evidence import EVIDENCE_COMMAND, parse_evidence
from .libvirt import LIBVIRT_COMMAND, link_domains, parse_libvirt
from .model import (
    KSM_DIR,
    KSM_RUN_VALUES,
    PERSIST_LINE,
    PERSIST_PATH,
    RUN_PATH,
    UNITS,
    HostState,
    Ksm,
    Persist,
    Unit,
)
from .vms import VMS_COMMAND, parse_error, parse_int, parse_qemu_server, parse_vms
from .watch import WATCH_COMMAND, parse_watch

__all__ = ["KSM_DIR", "KSM_HOST_COMMAND", "PERSIST_PATH", "RUN_PATH", "UNITS", "KsmHost"]

# Files under /sys/kernel/mm/ksm that hold something other than an integer.
_TEXT_FILES = {"advisor_mode"}
# Files that must hold integers; an unknown file keeps its text when it is not one.
_INT_FILES = {
    "run", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
    "pages_scanned", "pages_skipped", "full_scans", "general_profit", "ksm_zero_pages",
    "sleep_millisecs", "pages_to_scan", "merge_across_nodes", "use_zero_pages",
    "max_page_sharing", "stable_node_chains", "stable_node_dups",
    "stable_node_chains_prune_millisecs", "smart_scan", "advisor_max_cpu",
    "advisor_min_pages_to_scan", "advisor_max_pages_to_scan", "advisor_target_scan_time",
}  # fmt: skip
_SECTIONS = ("meta", "meminfo", "ksm", "units", "persist", "vms")


@dataclass(frozen=True)
class Section:
    """
    A later part of the one fact command: its shell, and the parser of its lines, whose result
    is stored under ``name``. Optional: output captured before the section existed still parses
    (to the same value, without that key), so an added section leaves every fixture valid.
    """

    name: str
    command: str
    parse: Callable[[list[str]], object]
    # Run once every section is parsed, when this one is in the output: to add what it says to
    # the other sections' values.
    finish: Callable[[HostState], None] | None = None


# Sections added after the core ones, in the order they run: ``evidence`` says which host
# answered and when (hostname, kernel, machine and boot ids, SSH host key fingerprints);
# ``libvirt_domains``, libvirt's QEMU domains and their nosharepages opt-out, given to the
# running VMs they belong to; ``cluster``, the Proxmox VE cluster the node is in.
EXTENSIONS: tuple[Section, ...] = (
    Section("evidence", EVIDENCE_COMMAND, parse_evidence),
    Section("libvirt_domains", LIBVIRT_COMMAND, parse_libvirt, link_domains),
    Section("cluster", CLUSTER_COMMAND, parse_cluster),
    Section("watch", WATCH_COMMAND, parse_watch),
)

SYSTEMD_DIR = "/run/systemd/system"


def ksm_read(ksm_dir: str = KSM_DIR) -> str:
    """Every KSM sysfs file as ``<dir>/<name>:<value>``, or ``absent``: the ``ksm`` section."""
    return f"if test -d {ksm_dir}; then grep -H . {ksm_dir}/*; else echo absent; fi"


def units_read(systemd_dir: str = SYSTEMD_DIR) -> str:
    """``systemctl show`` of the KSM units, or ``no-systemd``: the ``units`` section."""
    return (
        f"if test -d {systemd_dir}; then systemctl show"
        " --property=Id,LoadState,ActiveState,UnitFileState " + " ".join(UNITS) + "; "
        "else echo no-systemd; fi"
    )


def persist_read(path: str = PERSIST_PATH) -> str:
    """``present``, ``modified`` or ``absent``: the ``persist`` section."""
    return (
        f"if grep -qsxF '{PERSIST_LINE}' {path}; then echo present; "
        f"elif test -e {path}; then echo modified; else echo absent; fi"
    )


# Each section starts with a marker line, so that every output line is accounted for.
CORE_COMMAND = "; ".join(
    (
        "echo '## meta'",
        'echo "uid=$(id -u)"',
        'echo "pagesize=$(getconf PAGESIZE)"',
        # Proxmox VE's qemu-server, if installed: its version says whether allow-ksm exists.
        "echo \"qemu_server=$(dpkg-query -W -f='${db:Status-Abbrev}|${Version}' qemu-server"
        ' 2>/dev/null)"',
        "echo '## meminfo'",
        "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo",
        "echo '## ksm'",
        ksm_read(),
        "echo '## units'",
        units_read(),
        "echo '## persist'",
        persist_read(),
        VMS_COMMAND,
    )
)


def host_command(extensions: tuple[Section, ...] = EXTENSIONS) -> str:
    """The core command followed by each extension section behind its marker."""
    return "; ".join(
        (CORE_COMMAND, *(f"echo '## {section.name}'; {section.command}" for section in extensions))
    )


KSM_HOST_COMMAND = host_command()


def _parse_ksm_line(line: str, ksm: Ksm) -> None:
    prefix = f"{KSM_DIR}/"
    if not line.startswith(prefix) or ":" not in line:
        raise parse_error(line, "a KSM sysfs line")
    name, _, value = line[len(prefix) :].partition(":")
    if "/" in name or not name:
        raise parse_error(line, "a KSM sysfs line")
    if name in _TEXT_FILES:
        # advisor_mode reads like "[none] scan-time": the bracketed word is in force.
        chosen = [word[1:-1] for word in value.split() if word.startswith("[")]
        if len(chosen) != 1:
            raise parse_error(line, f"KSM {name}")
        ksm[name] = chosen[0]
    elif name in _INT_FILES:
        ksm[name] = parse_int(value, line, f"KSM {name}")
        if name == "run" and ksm[name] not in KSM_RUN_VALUES:
            # Not a value mm/ksm.c can show (0, 1, 2, each maybe with the offline bit 4): a
            # kernel with another meaning for run must not be judged by the old one.
            raise parse_error(line, "KSM run (mm/ksm.c shows 0, 1, 2, 4, 5 or 6)")
    else:
        try:
            ksm[name] = int(value)
        except ValueError:
            ksm[name] = value


def _parse_unit_line(line: str, units: dict[str, dict[str, str]], current: list[str]) -> None:
    key, sep, value = line.partition("=")
    if not sep:
        raise parse_error(line, "a systemctl show line")
    if key == "Id":
        if value not in UNITS:
            raise parse_error(line, "a systemctl unit id")
        current[:] = [value]
        units[value] = {}
        return
    field = {"LoadState": "load", "ActiveState": "active", "UnitFileState": "unit_file"}.get(key)
    if field is None or not current:
        raise parse_error(line, "a systemctl show line")
    units[current[0]][field] = value


def parse_ksm_host(output: list[str], extensions: tuple[Section, ...] = EXTENSIONS) -> HostState:
    """Turn the output of ``KSM_HOST_COMMAND`` into the plain dict ``KsmHost`` returns."""
    extra: dict[str, list[str]] = {}
    meta: dict[str, int] = {}
    qemu_server: list[str | None] = []
    vm_lines: list[str] = []
    meminfo: dict[str, int] = {}
    ksm: Ksm | None = {}
    units: dict[str, dict[str, str]] = {}
    current_unit: list[str] = []
    systemd = True
    persist: Persist | None = None
    section: str | None = None
    seen: list[str] = []

    for raw in output:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("## "):
            section = line[3:]
            known = (*_SECTIONS, *(extension.name for extension in extensions))
            if section not in known or section in seen:
                raise parse_error(line, "a section marker")
            seen.append(section)
            continue
        if section in extra or (section not in _SECTIONS and section is not None):
            extra.setdefault(section, []).append(line)
            continue
        if section == "meta" and line.startswith("qemu_server=") and not qemu_server:
            qemu_server.append(parse_qemu_server(line.partition("=")[2], line))
        elif section == "meta":
            key, sep, value = line.partition("=")
            if not sep or key not in ("uid", "pagesize"):
                raise parse_error(line, "a host meta line")
            meta[key] = parse_int(value, line, key)
        elif section == "meminfo":
            key, _, rest = line.partition(":")
            parts = rest.split()
            if key not in ("MemTotal", "MemAvailable") or len(parts) != 2 or parts[1] != "kB":
                raise parse_error(line, "a /proc/meminfo line")
            meminfo[key] = parse_int(parts[0], line, key) * 1024
        elif section == "ksm":
            if line == "absent" and ksm == {}:
                ksm = None
            elif ksm is None:
                raise parse_error(line, "KSM output after 'absent'")
            else:
                _parse_ksm_line(line, ksm)
        elif section == "units":
            if line == "no-systemd" and not units and systemd:
                systemd = False
            else:
                _parse_unit_line(line, units, current_unit)
        elif section == "persist":
            states: tuple[Persist, ...] = get_args(Persist)
            if persist is not None or line not in states:
                raise parse_error(line, "the persistence state")
            persist = states[states.index(line)]
        elif section == "vms":
            vm_lines.append(line)
        else:
            raise parse_error(line, "a line outside any section")

    missing = [name for name in _SECTIONS if name not in seen]
    if missing:
        raise FactProcessError(f"ksm-guard fact output lacks section(s): {', '.join(missing)}")
    if set(meta) != {"uid", "pagesize"} or set(meminfo) != {"MemTotal", "MemAvailable"}:
        raise FactProcessError("ksm-guard fact output lacks uid, page size or memory figures")
    if not qemu_server:
        raise FactProcessError("ksm-guard fact output lacks the qemu_server line")
    if ksm is not None and "run" not in ksm:
        raise FactProcessError(f"ksm-guard fact output has no {RUN_PATH}")
    vms, pve_configs = parse_vms(vm_lines, meta["pagesize"])
    typed_units: dict[str, Unit] = {}
    for name, unit in units.items():
        if "load" not in unit or "active" not in unit:
            raise FactProcessError("ksm-guard fact output has an incomplete unit block")
        typed_units[name] = {
            "load": unit["load"],
            "active": unit["active"],
            "unit_file": unit.get("unit_file", ""),
        }

    state: HostState = {
        "uid": meta["uid"],
        "page_size": meta["pagesize"],
        "mem_total": meminfo["MemTotal"],
        "mem_available": meminfo["MemAvailable"],
        "ksm": ksm,
        "systemd": systemd,
        "units": typed_units,
        "persist": "absent" if persist is None else persist,
        "qemu_server": qemu_server[0],
        "vms": vms,
        "pve_configs": pve_configs,
    }
    found = cast(dict[str, object], state)
    for extension in extensions:
        if extension.name in seen:
            found[extension.name] = extension.parse(extra.get(extension.name, []))
    for extension in extensions:
        if extension.name in seen and extension.finish is not None:
            extension.finish(state)
    return state


class KsmHost(FactBase[HostState]):
    """
    Returns the host's whole KSM picture: sysfs knobs and counters, the ksmtuned and ksm
    units, memory, page size, effective uid, the boot-persistence file, and the running QEMU
    VMs with their merged pages, resident and configured memory (Proxmox VE: VMID, name,
    ``allow-ksm``, lock, template and memory from the configs; libvirt: each domain's
    ``<nosharepages/>``). One VM's unreadable files give that VM an ``error``; they never fail
    the fact.

    .. code:: python

        {
            "uid": 0,
            "page_size": 4096,
            "mem_total": 8201744384,
            "mem_available": 6012342272,
            "ksm": {"run": 1, "pages_shared": 64, "pages_sharing": 16320, ...},  # None: no KSM
            "systemd": True,
            "units": {
                "ksmtuned.service": {"load": "loaded", "active": "active", "unit_file": "enabled"},
                "ksm.service": {"load": "not-found", "active": "inactive", "unit_file": ""},
            },
            "persist": "absent",  # or "present", "modified"
            "qemu_server": "9.0.27",  # None: not installed
            "vms": [
                {"pid": 4242, "vmid": "100", "name": "web1", "uuid": None,
                 "merged_pages": 16320, "merged_bytes": 66846720, "ksm_zero_pages": None,
                 "mem_merge": True, "allow_ksm": False, "restart_pending": True,
                 "rss_bytes": 1887449088, "configured_bytes": 2147483648, "error": None},
            ],
            "pve_configs": {
                "100": {"name": "web1", "allow_ksm": False, "lock": None, "template": False,
                        "configured_bytes": 2147483648, "error": None},
            },
            # Present when the output has the section (operations/evidence.py):
            "evidence": {"time": "2025-03-01T08:15:00Z", "hostname": "pve1",
                         "kernel": "6.8.12-8-pve", "machine_id": "3d12...",
                         "boot_id": "6512...", "ssh_keygen": True,
                         "host_keys": [{"path": "/etc/ssh/ssh_host_ed25519_key.pub", "bits": 256,
                                        "fingerprint": "SHA256:tTkR...", "comment": "root@pve1",
                                        "type": "ED25519"}]},
            # libvirt's QEMU domains (None: no libvirt); a running one's nosharepages is its
            # VM's allow_ksm (operations/libvirt.py)
            "libvirt_domains": {
                "db1": {"pid": 5120, "persistent": True, "nosharepages": True, "error": None},
            },
            # its Proxmox VE cluster from /etc/pve/.members (None: no such file; name None: a
            # node in no cluster), operations/cluster.py
            "cluster": {"name": "prod", "node": "pve1", "error": None},
        }
    """

    def command(self) -> str:
        return KSM_HOST_COMMAND

    def process(self, output: list[str]) -> HostState:
        return parse_ksm_host(output)
