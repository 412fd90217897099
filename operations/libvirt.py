"""libvirt's QEMU domains: the ``## libvirt_domains`` part of the KsmHost fact, and its parser."""

from __future__ import annotations

import re

from .model import HostState, LibvirtDomain
from .vms import parse_error

# Where a privileged libvirtd keeps a QEMU domain's files (libvirt/libvirt src/qemu/qemu_conf.c
# at 49f326edc0f9, virQEMUDriverConfigNew: stateDir = RUNSTATEDIR "/libvirt/qemu", configBaseDir =
# SYSCONFDIR "/libvirt", the QEMU configs in its "qemu" folder). Each is named after the domain:
# ``<name>.pid`` holds the running QEMU's pid (qemu_process.c: virPidFileBuildPath(stateDir,
# name)), ``<name>.xml`` of the run folder is the live definition inside ``<domstatus>``, and
# ``<name>.xml`` of the config folder the persistent definition, what the next start uses.
LIBVIRT_RUN_DIR = "/run/libvirt/qemu"
LIBVIRT_CONF_DIR = "/etc/libvirt/qemu"
# ``<memoryBacking><nosharepages/></memoryBacking>`` becomes QEMU's ``-machine ...,mem-merge=off``
# (src/qemu/qemu_command.c at 4cf223962aa3, qemuAppendDomainMemoryMachineParams): libvirt's
# counterpart of Proxmox VE's ``allow-ksm: 0``. libvirt writes one element per line.
NOSHAREPAGES = "<nosharepages"


def libvirt_command(run_dir: str = LIBVIRT_RUN_DIR, conf_dir: str = LIBVIRT_CONF_DIR) -> str:
    """
    The section's shell: ``absent`` without libvirt's QEMU folders; else ``<folder>:?`` for a
    folder that cannot be listed, and one ``path:value`` line per file: a pid file's first line,
    a definition's count of ``<nosharepages`` lines (0 included), or ``?`` when the file could not
    be read (only root may read libvirt's files). It exits 0 whatever it could read.
    """
    listable = '{ test -r "$d" && test -x "$d"; }'
    return (
        f"if test -d {run_dir} || test -d {conf_dir}; then"
        f" for d in {run_dir} {conf_dir}; do"
        f' if test -d "$d" && ! {listable}; then echo "$d:?"; fi; done;'
        f" for f in {run_dir}/*.pid {run_dir}/*.xml {conf_dir}/*.xml; do"
        ' test -e "$f" || continue;'  # a glob that matched nothing
        ' case "$f" in *.pid) v=$(head -n 1 "$f" 2>/dev/null) || v=\'?\';;'
        # grep -c exits 1 for a count of 0, 2 when it cannot read the file
        f" *) v=$(grep -c '{NOSHAREPAGES}' \"$f\" 2>/dev/null); test $? -le 1 || v='?';; esac;"
        ' echo "$f:$v"; done;'
        " else echo absent; fi"
    )


LIBVIRT_COMMAND = libvirt_command()


def parse_libvirt(
    lines: list[str], run_dir: str = LIBVIRT_RUN_DIR, conf_dir: str = LIBVIRT_CONF_DIR
) -> dict[str, LibvirtDomain] | None:
    """
    The section's lines as libvirt's QEMU domains by name; None when the host has no libvirt.

    A domain is every name with a pid file or a definition. Its ``nosharepages`` is that of the
    definition it starts with next: the persistent one when there is one, else (a transient
    domain, gone when it stops) the live one; None, with the domain's ``error``, when that
    cannot be told. What one domain's files hold never fails the fact.
    """
    if lines == ["absent"]:
        return None
    unlisted: list[str] = []
    files: dict[str, dict[str, str]] = {}  # domain → {"pid"|"live"|"persistent": value}
    for line in lines:
        folder, sep, value = line.rpartition(":")
        if folder in (run_dir, conf_dir) and value == "?" and folder not in unlisted:
            unlisted.append(folder)
            continue
        match = re.fullmatch(
            f"({re.escape(run_dir)}|{re.escape(conf_dir)})/([^/]+)\\.(pid|xml)", folder
        )
        if not sep or match is None or (match.group(1) == conf_dir and match.group(3) == "pid"):
            raise parse_error(line, "a libvirt domain line")
        kind = {"pid": "pid", "xml": "live" if match.group(1) == run_dir else "persistent"}
        files.setdefault(match.group(2), {})[kind[match.group(3)]] = value
    return {name: _domain(name, found, unlisted, conf_dir) for name, found in sorted(files.items())}


def _domain(name: str, found: dict[str, str], unlisted: list[str], conf_dir: str) -> LibvirtDomain:
    """One domain from the values of its files (see parse_libvirt)."""
    errors: list[str] = []
    pid = found.get("pid", "")
    if not pid.isdigit() and pid:
        errors.append(f"{name}.pid unread" if pid == "?" else f"{name}.pid: {pid!r} is not a pid")
    persistent: bool | None = "persistent" in found
    definition = "persistent" if persistent else "live"
    count = found.get(definition)
    if not persistent and conf_dir in unlisted:
        persistent, count = None, None  # its persistent definition may be there, unseen
        errors.append(f"{conf_dir} cannot be listed")
    elif count is None:
        errors.append(f"no definition ({name}.xml) found")
    elif not count.isdigit():
        errors.append(f"{name}.xml ({definition} definition) unread")
    return {
        "pid": int(pid) if pid.isdigit() else None,
        "persistent": persistent,
        "nosharepages": int(count) > 0 if count and count.isdigit() else None,
        "error": "; ".join(errors) or None,
    }


def link_domains(state: HostState) -> None:
    """
    Give each running VM of a libvirt domain that domain's opt-out, as ``allow_ksm`` (``not
    nosharepages``: what the VM starts with next) and ``restart_pending`` (it runs otherwise).
    The VM is the domain's when its pid is the one in the domain's pid file, as libvirt itself
    tells (qemuProcessReconnect reads that file). A VM with a Proxmox VE config keeps its own.
    """
    domains = state.get("libvirt_domains") or {}
    by_pid = {domain["pid"]: (name, domain) for name, domain in domains.items() if domain["pid"]}
    for vm in state["vms"]:
        found = by_pid.get(vm["pid"])
        if found is None or vm["vmid"] is not None:
            continue
        name, domain = found
        vm["name"] = vm["name"] or name
        if domain["error"]:
            vm["error"] = "; ".join(filter(None, (vm["error"], f"libvirt: {domain['error']}")))
        if domain["nosharepages"] is None:
            continue
        vm["allow_ksm"] = not domain["nosharepages"]
        mem_merge = vm["mem_merge"]
        vm["restart_pending"] = mem_merge is not None and mem_merge != vm["allow_ksm"]
