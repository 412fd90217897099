"""The running QEMU VMs of a host: the ``## vms`` part of the KsmHost fact, and its parsers."""

from __future__ import annotations

import re
from typing import Any

from pyinfra.api.exceptions import FactProcessError

from .model import PveConfig, Vm

PVE_PID_DIR = "/var/run/qemu-server"
PVE_CONF_DIR = "/etc/pve/qemu-server"
# A QEMU process's command name (/proc/PID/comm is cut at 15 characters: qemu-system-x86).
QEMU_COMM = "kvm|qemu-kvm|qemu-system-.+"
# ksm_stat fields (6.1+: ksm_rmap_items; 6.6: ksm_zero_pages; 6.7: ksm_merging_pages,
# ksm_process_profit; 6.8+: ksm_merge_any, ksm_mergeable; more may come).
_STAT_TEXT = {"ksm_merge_any", "ksm_mergeable"}

# One line per piece, every one prefixed by the file it comes from, so the parser can tell them
# apart: pid files, the configs' name/allow-ksm/section lines, then per QEMU process its comm,
# cmdline (NULs as tabs) and KSM counters. ``grep -s`` skips a file that vanished (a VM stopping
# between listing and reading) or that only root may read; a vanished process leaves an empty
# cmdline, which the parser drops. The loop is last: it must exit 0 whatever it could read.
VMS_COMMAND = "; ".join(
    (
        "echo '## vms'",
        f"grep -sH . {PVE_PID_DIR}/*.pid",
        f"grep -sHE '^(name|allow-ksm|delete):|^\\[' {PVE_CONF_DIR}/*.conf",
        f"for c in $(grep -sHxE '{QEMU_COMM}' /proc/[0-9]*/comm); do d=${{c%/comm:*}}; echo \"$c\"",
        # The process may exit between listing and reading: that read's error is expected.
        "printf '%s:' \"$d/cmdline\"; tr '\\000' '\\t' 2>/dev/null <\"$d/cmdline\"; echo",
        # Unreadable counters (not root) make grep fail: that must not fail the whole fact.
        'grep -sH . "$d/ksm_merging_pages" "$d/ksm_stat" || true; done',
    )
)

_PROC = re.compile(r"/proc/(\d+)/(comm|cmdline|ksm_merging_pages|ksm_stat):(.*)")
_PIDFILE = re.compile(re.escape(PVE_PID_DIR) + r"/(\d+)\.pid:(.*)")
_CONF = re.compile(re.escape(PVE_CONF_DIR) + r"/(\d+)\.conf:(.*)")


def parse_error(line: str, why: str) -> FactProcessError:
    """The error for an output line that is not what the fact command prints."""
    return FactProcessError(f"ksm-guard cannot parse {why}: {line!r}")


def parse_int(text: str, line: str, why: str) -> int:
    """``text`` as an integer, or the parse error for ``line``."""
    try:
        return int(text.strip())
    except ValueError:
        raise parse_error(line, why) from None


def parse_qemu_server(value: str, line: str) -> str | None:
    """``dpkg-query``'s ``${db:Status-Abbrev}|${Version}``: the installed version, or None."""
    if not value.strip():
        return None  # no dpkg, or dpkg has never heard of qemu-server
    status, sep, version = value.partition("|")
    status = status.strip()
    if not sep or not re.fullmatch(r"[a-zA-Z]{2,3}", status):
        raise parse_error(line, "the qemu-server package state")
    if status[1] != "i" or not version.strip():
        return None  # removed, half-installed, or only its config files left
    return version.strip()


def _bool(text: str, line: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "on", "yes", "true"):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    raise parse_error(line, "a Proxmox VE boolean")


def parse_pve_config(lines: list[str]) -> PveConfig:
    """
    The ``name`` and ``allow-ksm`` of one VM config's lines (``key: value`` and ``[section]``).

    Only the main section and ``[PENDING]`` count: snapshots (``[name]``) and other special
    sections are ignored. ``allow_ksm`` is what the VM starts with next (the pending value when
    there is one; ``True``, qemu-server's default, when unset).
    """
    main: dict[str, str] = {}
    pending: dict[str, str] = {}
    target: dict[str, str] | None = main
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("["):
            if not text.endswith("]"):
                raise parse_error(line, "a Proxmox VE config section")
            target = pending if text == "[PENDING]" else None
            continue
        key, sep, value = text.partition(":")
        if not sep or not key:
            raise parse_error(line, "a Proxmox VE config line")
        if target is not None:
            target[key.strip()] = value.strip()
    deleted = {item.strip() for item in pending.get("delete", "").split(",") if item.strip()}
    current = True
    if "allow-ksm" in main:
        current = _bool(main["allow-ksm"], f"allow-ksm: {main['allow-ksm']}")
    upcoming = current
    if "allow-ksm" in pending:
        upcoming = _bool(pending["allow-ksm"], f"allow-ksm: {pending['allow-ksm']}")
    elif "allow-ksm" in deleted:
        upcoming = True
    return {
        "name": main.get("name") or None,
        "allow_ksm": upcoming,
    }


def _qemu_option(value: str) -> str:
    """The first field of a QEMU option value (``a,,b,x=y`` → ``a,b``), ``guest=`` dropped."""
    field = re.split(r"(?<!,),(?!,)", value, maxsplit=1)[0].replace(",,", ",")
    return field.removeprefix("guest=")


def parse_cmdline(args: list[str]) -> dict[str, Any]:
    """QEMU's ``-name``, ``-uuid`` and whether ``mem-merge`` is on (QEMU's default)."""
    found: dict[str, Any] = {"name": None, "uuid": None, "mem_merge": True}
    for flag, value in zip(args, [*args[1:], ""], strict=True):
        option = flag.lstrip("-") if flag.startswith("-") else None
        if option == "name":
            found["name"] = _qemu_option(value) or None
        elif option == "uuid":
            found["uuid"] = value or None
        elif option in ("machine", "M"):
            for setting in value.split(","):
                key, _, raw = setting.partition("=")
                if key == "mem-merge":
                    found["mem_merge"] = raw.lower() not in ("off", "no", "false")
    return found


def parse_ksm_stat(lines: list[str]) -> dict[str, Any]:
    """``/proc/PID/ksm_stat`` lines (``field value``, 6.8+ also ``field: yes``) as a dict."""
    stat: dict[str, Any] = {}
    for line in lines:
        key, _, value = line.strip().partition(" ")
        key = key.removesuffix(":")
        if not re.fullmatch(r"[a-z_]+", key) or not value.strip():
            raise parse_error(line, "a /proc/PID/ksm_stat line")
        if key in _STAT_TEXT:
            stat[key] = value.strip()
        else:
            stat[key] = parse_int(value, line, f"ksm_stat {key}")
    return stat


def parse_vms(lines: list[str], page_size: int) -> tuple[list[Vm], dict[str, PveConfig]]:
    """
    The ``## vms`` lines: the running QEMU processes, and the Proxmox VE configs by VMID.

    A process that exited between listing and reading (empty cmdline) is left out; a pid file
    whose process is gone is ignored.
    """
    pidfiles: dict[int, str] = {}
    conf_lines: dict[str, list[str]] = {}
    procs: dict[int, dict[str, Any]] = {}
    for line in lines:
        match = _PROC.fullmatch(line)
        if match:
            pid, what, value = int(match.group(1)), match.group(2), match.group(3)
            proc = procs.setdefault(pid, {"comm": None, "cmdline": None, "stat": []})
            if what == "comm":
                proc["comm"] = value
            elif what == "cmdline":
                proc["cmdline"] = value
            elif what == "ksm_merging_pages":
                proc["merging"] = parse_int(value, line, "/proc/PID/ksm_merging_pages")
            else:
                proc["stat"].append(value)
            continue
        match = _PIDFILE.fullmatch(line)
        if match:
            pidfiles[parse_int(match.group(2), line, "a qemu-server pid file")] = match.group(1)
            continue
        match = _CONF.fullmatch(line)
        if match:
            conf_lines.setdefault(match.group(1), []).append(match.group(2))
            continue
        raise parse_error(line, "a VM line")

    configs = {
        vmid: parse_pve_config(text) for vmid, text in sorted(conf_lines.items(), key=_by_id)
    }
    vms: list[Vm] = []
    for pid, proc in sorted(procs.items()):
        if proc["comm"] is None:
            raise FactProcessError(f"ksm-guard fact output has VM data without a comm: pid {pid}")
        args = proc["cmdline"].split("\t") if proc["cmdline"] else []
        if not args:
            continue  # exited while being read, or a kernel thread of that name
        cmdline = parse_cmdline(args)
        stat = parse_ksm_stat(proc["stat"])
        merging = proc.get("merging", stat.get("ksm_merging_pages"))
        vmid = pidfiles.get(pid)
        config = configs.get(vmid) if vmid else None
        allow_ksm = config["allow_ksm"] if config else None
        vms.append(
            {
                "pid": pid,
                "vmid": vmid,
                "name": (config["name"] if config else None) or cmdline["name"],
                "uuid": cmdline["uuid"],
                "merged_pages": merging,
                "merged_bytes": None if merging is None else merging * page_size,
                "ksm_zero_pages": stat.get("ksm_zero_pages"),
                "mem_merge": cmdline["mem_merge"],
                "allow_ksm": allow_ksm,
                "restart_pending": allow_ksm is not None and allow_ksm != cmdline["mem_merge"],
            }
        )
    return vms, configs


def _by_id(item: tuple[str, Any]) -> int:
    return int(item[0])
