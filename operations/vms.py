"""The running QEMU VMs of a host: the ``## vms`` part of the KsmHost fact, and its parsers."""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api.exceptions import FactProcessError

from .model import PveConfig, Vm

PVE_PID_DIR = "/var/run/qemu-server"
PVE_CONF_DIR = "/etc/pve/qemu-server"
# A QEMU process's command name (/proc/PID/comm is cut at 15 characters: qemu-system-x86).
# Proxmox VE's is kvm (ksm-control-daemon's ksmtuned counts ``ps -C kvm``: proxmox/
# ksm-control-daemon 23493367 debian/patches/ksmtuned.diff); the rest is ksmtuned's own pattern
# (ksmtuned/ksmtuned 018d0ed5876a src/ksmtuned.sh.in committed_memory:
# ``^qemu(-(kvm|system-.+)|:.{1,11})$``), whose ``qemu:<name>`` is the name QEMU gives itself
# for libvirt's ``-name guest=<name>,process=qemu:<name>`` (qemu.conf set_process_name).
QEMU_COMM = "kvm|qemu-kvm|qemu-system-.+|qemu:.{1,11}"
# The config keys read: name, KSM (allow-ksm, args, pending deletes), memory, lock, template.
CONF_KEYS = ("name", "allow-ksm", "delete", "args", "memory", "lock", "template")
# /proc/PID/ksm_stat fields, in the order fs/proc/base.c proc_pid_ksm_stat() prints them (blame of
# torvalds/linux master 43e9ad0c55a3, Oct 2025): ksm_rmap_items (6.1, cb4df4cae4f2),
# ksm_zero_pages (6.6; "%ld" since c2dc78b86e08), ksm_merging_pages and ksm_process_profit (6.4,
# d21077fbc2fc), then "ksm_merge_any: yes|no" and "ksm_mergeable: yes|no" (3ab76c767bc7, in
# linux-next from next-20250128, so 6.15; 6.6 to 6.14 print the four numbers only). More may come.
_STAT_TEXT = {"ksm_merge_any", "ksm_mergeable"}

# One line per piece, every one prefixed by the file it comes from, so the parser can tell them
# apart: pid files, the configs' lines that matter here (CONF_KEYS and section headers), then per
# QEMU process its comm, cmdline (NULs as tabs), KSM counters and VmRSS. ``grep -s`` skips a file
# that vanished (a VM stopping between listing and reading) or that only root may read; a
# vanished process leaves an empty cmdline, which the parser drops. The loop is last: it must
# exit 0 whatever it could read.
VMS_COMMAND = "; ".join(
    (
        "echo '## vms'",
        f"grep -sH . {PVE_PID_DIR}/*.pid",
        f"grep -sHE '^({'|'.join(CONF_KEYS)}):|^\\[' {PVE_CONF_DIR}/*.conf",
        f"for c in $(grep -sHxE '{QEMU_COMM}' /proc/[0-9]*/comm); do d=${{c%/comm:*}}; echo \"$c\"",
        # The process may exit between listing and reading: that read's error is expected.
        "printf '%s:' \"$d/cmdline\"; tr '\\000' '\\t' 2>/dev/null <\"$d/cmdline\"; echo",
        # Unreadable counters (not root) make grep fail: that must not fail the whole fact.
        'grep -sH . "$d/ksm_merging_pages" "$d/ksm_stat"',
        "grep -sH '^VmRSS:' \"$d/status\" || true; done",
    )
)

_PROC = re.compile(r"/proc/(\d+)/(comm|cmdline|ksm_merging_pages|ksm_stat|status):(.*)")
# Every *.pid file of the run directory: qemu-server also keeps <vmid>.swtpm.pid (swtpm of a
# TPM) and qsd-<id>.pid (qemu-storage-daemon) there; only <vmid>.pid is a VM's.
_RUN_FILE = re.compile(re.escape(PVE_PID_DIR) + r"/([^/]*?\.pid):(.*)")
_VM_PIDFILE = re.compile(r"(\d+)\.pid")
_CONF = re.compile(re.escape(PVE_CONF_DIR) + r"/([^/]*?\.conf):(.*)")
_VM_CONF = re.compile(r"(\d+)\.conf")

# qemu-server 9.2.6 (proxmox/qemu-server e6352be67f70, src/PVE/QemuServer.pm parse_vm_config):
# section headers, and ``key: value`` lines (``args`` and ``delete`` have their own patterns
# there, matching the same lines).
_SECTION = re.compile(r"\[([^\]]*)\]\s*")
_PENDING = re.compile(r"PENDING", re.IGNORECASE)
_KEY_VALUE = re.compile(r"([a-z][a-z_\-]*\d*):\s*(.+?)\s*")
# The ``lock`` enum of qemu-server's confdesc.
PVE_LOCKS = frozenset(
    (
        "backup", "clone", "create", "migrate", "rollback", "snapshot", "snapshot-delete",
        "suspending", "suspended",
    )
)  # fmt: skip
# qemu-server's memory_fmt (src/PVE/QemuServer/Memory.pm): ``[current=]<MiB>``, minimum 16,
# default 512 when ``memory`` is unset.
PVE_MEMORY_DEFAULT_MIB = 512
_MIB = 1024 * 1024
_QEMU_SIZE_UNITS = {suffix: 1024**power for power, suffix in enumerate("BKMGTPE")}


class VmFileError(ValueError):
    """One VM's file holds something that cannot be read: the VM's ``error``, not the fact's."""


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


def pve_bool(text: str) -> bool:
    """
    A Proxmox VE boolean as qemu-server's ``check_type`` reads one: ``1`` and
    ``on``/``yes``/``true`` (any case), ``0`` and ``off``/``no``/``false``; anything else raises
    VmFileError.
    """
    if text == "1" or text.lower() in ("on", "yes", "true"):
        return True
    if text == "0" or text.lower() in ("off", "no", "false"):
        return False
    raise VmFileError(f"{text!r} is not a boolean")


def qemu_bool(text: str) -> bool:
    """
    A QEMU boolean as ``qapi_bool_parse`` reads one (qemu/qemu qapi/qapi-util.c at 54e91d1523b4;
    QemuOpts call it in util/qemu-option.c at 0849cb547844, and current QEMU's keyval visitor,
    which reads ``-machine``, in qobject_input_type_bool_keyval): ``on``/``yes``/``true``/``y``
    and ``off``/``no``/``false``/``n``, exactly, in lower case. Anything else raises VmFileError.
    (Older QEMU took on/off only: a running process's spelling was taken by its QEMU anyway.)
    """
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise VmFileError(f"{text!r} is not a QEMU boolean")


def keyval(text: str, implied: str) -> list[tuple[str, str | None]]:
    """
    QEMU's ``KEY=VALUE,...`` option syntax (util/keyval.c; QemuOpts reads it the same way): ``,,``
    is a literal comma; a first item without ``=`` is the value of the ``implied`` key. A later
    key without ``=`` comes back with the value None (QEMU refuses it).
    """
    items: list[tuple[str, str | None]] = []
    rest = text
    while rest:
        key = re.split(r"[=,]", rest, maxsplit=1)[0]
        has_value = rest[len(key) :].startswith("=")
        if not items and not has_value:
            key = implied  # the whole first item is the implied key's value
        elif not has_value:
            items.append((key, None))
            rest = rest[len(key) + 1 :]
            continue
        else:
            rest = rest[len(key) + 1 :]
        value = []
        while rest:
            if rest.startswith(",,"):
                value.append(",")
                rest = rest[2:]
            elif rest.startswith(","):
                rest = rest[1:]
                break
            else:
                value.append(rest[0])
                rest = rest[1:]
        items.append((key, "".join(value)))
    return items


def qemu_size(text: str, default_unit: str) -> int:
    """
    A QEMU size (util/cutils.c ``do_strtosz`` at 342e3a4f2065): a decimal number, optionally with
    a fraction, and one suffix B/K/M/G/T/P/E (any case, powers of 1024); without a suffix the
    ``default_unit``. A fraction of a byte is refused. Raises VmFileError.
    """
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([bBkKmMgGtTpPeE]?)", text.strip())
    if not match:
        raise VmFileError(f"{text!r} is not a QEMU size")
    number, suffix = match.group(1), (match.group(2) or default_unit).upper()
    unit = _QEMU_SIZE_UNITS[suffix]
    if unit == 1 and "." in number and float(number) % 1:
        raise VmFileError(f"{text!r} is not a QEMU size (a fraction of a byte)")
    return int(float(number) * unit) if "." in number else int(number) * unit


def _options(args: list[str], *names: str) -> list[str]:
    """The values of QEMU options ``-name``/``--name`` (any of ``names``), in command-line order."""
    wanted = {f"-{name}" for name in names} | {f"--{name}" for name in names}
    return [value for flag, value in itertools.pairwise(args) if flag in wanted]


def machine_mem_merge(args: list[str]) -> bool | None:
    """
    The ``mem-merge`` that QEMU's ``-machine``/``-M`` options give, None when none sets it. QEMU
    merges every ``-machine`` into one dictionary, the last value of a key winning (qemu/qemu
    system/vl.c at 58deb358c661: ``keyval_parse_into(machine_opts_dict, ...)``). Raises
    VmFileError for a spelling QEMU does not take.
    """
    found: bool | None = None
    for value in _options(args, "machine", "M"):
        for key, raw in keyval(value, implied="type"):
            if key != "mem-merge":
                continue
            if raw is None:
                raise VmFileError("-machine mem-merge without a value")
            try:
                found = qemu_bool(raw)
            except VmFileError as error:
                raise VmFileError(f"-machine mem-merge={raw}: {error}") from None
    return found


def qemu_memory_bytes(args: list[str]) -> int | None:
    """
    The most guest RAM QEMU's ``-m`` allows: ``maxmem`` when given (memory hotplug), else ``size``;
    None without ``-m``. ``-m`` options merge, the last value of a key winning (system/vl.c:
    QemuOpts ``memory`` with ``merge_lists``, implied key ``size``); a size without a suffix is MiB
    (``parse_memory_options``: "legacy suffix-less format"), ``maxmem`` without one is bytes.
    Raises VmFileError.
    """
    settings: dict[str, str | None] = {}
    for value in _options(args, "m"):
        settings.update(keyval(value, implied="size"))
    size, maxmem = settings.get("size"), settings.get("maxmem")
    if size is None and maxmem is None:
        return None
    found = [qemu_size(size, "M")] if size else []
    found += [qemu_size(maxmem, "B")] if maxmem else []
    return max(found) if found else None


def parse_cmdline(args: list[str]) -> dict[str, Any]:
    """
    A QEMU command line: ``-name`` (its implied ``guest``), ``-uuid``, ``-pidfile``, mem-merge (on,
    QEMU's default on Linux, when no ``-machine`` sets it: hw/core/machine.c machine_initfn at
    134253a4fe9a) and the ``-m`` bytes. What cannot be read is listed in ``errors`` and left None.
    """
    found: dict[str, Any] = {
        "name": None, "uuid": None, "pidfile": None, "mem_merge": True, "memory_bytes": None,
        "errors": [],
    }  # fmt: skip
    for value in _options(args, "name"):
        found["name"] = dict(keyval(value, implied="guest")).get("guest") or None
    for value in _options(args, "uuid"):
        found["uuid"] = value or None
    for value in _options(args, "pidfile"):
        found["pidfile"] = value
    try:
        mem_merge = machine_mem_merge(args)
        found["mem_merge"] = True if mem_merge is None else mem_merge
    except VmFileError as error:
        found["mem_merge"] = None
        found["errors"].append(str(error))
    try:
        found["memory_bytes"] = qemu_memory_bytes(args)
    except VmFileError as error:
        found["errors"].append(f"-m: {error}")
    return found


def parse_ksm_stat(lines: list[str]) -> dict[str, Any]:
    """
    ``/proc/PID/ksm_stat`` lines (``field value``; 6.15+ also ``field: yes``) as a dict. Raises
    VmFileError for a line that is neither.
    """
    stat: dict[str, Any] = {}
    for line in lines:
        key, _, value = line.strip().partition(" ")
        key = key.removesuffix(":")
        if not re.fullmatch(r"[a-z_]+", key) or not value.strip():
            raise VmFileError(f"ksm_stat line {line!r}")
        if key in _STAT_TEXT:
            stat[key] = value.strip()
        elif re.fullmatch(r"-?\d+", value.strip()):
            stat[key] = int(value)
        else:
            raise VmFileError(f"ksm_stat line {line!r}")
    return stat


def parse_vm_rss(lines: list[str]) -> int | None:
    """
    ``VmRSS:   <n> kB`` of /proc/PID/status in bytes; None when absent. VmRSS is the resident
    anonymous, file and shmem pages (fs/proc/task_mmu.c task_mem at torvalds/linux 2135a6ec3eb9:
    ``total_rss = anon + file + shmem``): hugetlb pages are not in it (they show as HugetlbPages),
    nor is swapped-out memory (VmSwap), and a page KSM merged counts in full in every process that
    maps it. Raises VmFileError.
    """
    if not lines:
        return None
    match = re.fullmatch(r"VmRSS:\s*(\d+)\s+kB", lines[-1].strip())
    if not match:
        raise VmFileError(f"VmRSS line {lines[-1]!r}")
    return int(match.group(1)) * 1024


def pending_deletes(value: str) -> set[str]:
    """
    The keys of a ``[PENDING]`` ``delete:`` (pve-guest-common src/PVE/AbstractConfig.pm
    parse_pending_delete at 4a8f6cbf78e1): items split at commas, semicolons and white space; a
    leading ``!`` marks a forced delete, and the key is deleted either way.
    """
    return {
        item.removeprefix("!") for item in re.split(r"[,;\s]+", value) if item.removeprefix("!")
    }


def pve_memory_mib(value: str) -> int:
    """qemu-server's ``memory`` property string ``[current=]<MiB>`` (integer, at least 16)."""
    current: str | None = None
    for key, raw in keyval(value, implied="current"):
        if key != "current" or raw is None or current is not None:
            raise VmFileError(f"{value!r} is not [current=]<MiB>")
        current = raw
    if current is None or not re.fullmatch(r"\d+", current) or int(current) < 16:
        raise VmFileError(f"{value!r} is not [current=]<MiB> of 16 or more")
    return int(current)


def _check_value(key: str, value: str) -> None:
    """Raise VmFileError when qemu-server would drop this line (``check_type`` fails)."""
    if key in ("allow-ksm", "template"):
        pve_bool(value)
    elif key == "memory":
        pve_memory_mib(value)
    elif key == "lock" and value not in PVE_LOCKS:
        raise VmFileError(f"{value!r} is not a qemu-server lock")


def args_mem_merge(args: str) -> bool | None:
    """
    The mem-merge a VM's ``args:`` sets. qemu-server appends ``args`` (split like a shell does:
    PVE::Tools::split_args is Text::ParseWords::shellwords) after its own ``-machine ...`` with the
    ``mem-merge=off`` of ``allow-ksm: 0`` (config_to_command), so a mem-merge in ``args`` wins.
    Raises VmFileError.
    """
    try:
        words = shlex.split(args)
    except ValueError:
        raise VmFileError(f"args {args!r} cannot be split like a shell does") from None
    try:
        return machine_mem_merge(words)
    except VmFileError as error:
        raise VmFileError(f"args: {error}") from None


@dataclass
class _ConfigReader:
    """The main section and [PENDING] of one config, with what could not be read."""

    main: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)  # main-section keys qemu-server would drop

    def read(self, lines: list[str]) -> None:
        target: dict[str, str] | None = self.main
        seen_pending = False
        for line in lines:
            text = line.rstrip()
            if not text.strip():
                continue
            section = _SECTION.fullmatch(text)
            if section:
                # [PENDING] counts; snapshots ([name]), [special:cloudinit], [special:fleecing]
                # and unknown sections are skipped.
                pending = bool(_PENDING.fullmatch(section.group(1)))
                if pending and seen_pending:
                    self.errors.append("a second [PENDING] section")
                seen_pending |= pending
                target = self.pending if pending else None
                continue
            if target is None:
                continue
            pair = _KEY_VALUE.fullmatch(text)
            if not pair:
                self.errors.append(f"line {line!r}")
                continue
            key, value = pair.group(1), pair.group(2)
            if key == "delete" and target is not self.pending:
                self.errors.append(f"{key}: outside [PENDING]")
                continue
            try:
                _check_value(key, value)
            except VmFileError as error:
                self.errors.append(f"{key}: {error}")
                if target is self.main:
                    self.dropped.add(key)
                continue
            target[key] = value

    def next_start(self, key: str) -> str | None:
        """The value at the next start, with pending deletes then pending values applied (the
        order of qemu-server's vmconfig_apply_pending)."""
        if key in self.pending:
            return self.pending[key]
        if key in pending_deletes(self.pending.get("delete", "")):
            return None
        return self.main.get(key)


def parse_pve_config(lines: list[str]) -> PveConfig:
    """
    One VM config's lines (the ``CONF_KEYS`` and section headers), read as qemu-server 9.2.6
    reads them (proxmox/qemu-server e6352be67f70, src/PVE/QemuServer.pm ``parse_vm_config``):
    only the main section and ``[PENDING]`` (any case) count; snapshots (``[name]``),
    ``[special:cloudinit]``/``[special:fleecing]`` and unknown sections do not. A line qemu-server
    would drop (it warns and reads on) is dropped here too and named in ``error``.

    ``allow_ksm`` is what the VM starts with next: the pending values applied (deletes, forced
    ``!key`` or not, then values), ``allow-ksm`` (default 1) giving ``-machine ...,mem-merge=off``
    unless a ``-machine mem-merge=`` in ``args`` overrides it (see ``args_mem_merge``).
    ``configured_bytes`` is the main section's ``memory`` (a pending change counts after the next
    start), 512 MiB when unset, None when unreadable.
    """
    reader = _ConfigReader()
    reader.read(lines)
    allow = reader.next_start("allow-ksm")
    allow_ksm = True if allow is None else pve_bool(allow)
    args = reader.next_start("args")
    if args is not None:
        try:
            from_args = args_mem_merge(args)
            allow_ksm = allow_ksm if from_args is None else from_args
        except VmFileError as error:
            reader.errors.append(str(error))
    memory = reader.main.get("memory")
    configured = None
    if "memory" not in reader.dropped:
        configured = (pve_memory_mib(memory) if memory else PVE_MEMORY_DEFAULT_MIB) * _MIB
    template = reader.main.get("template")
    return {
        "name": reader.main.get("name") or None,
        "allow_ksm": allow_ksm,
        "lock": reader.main.get("lock"),
        "template": pve_bool(template) if template is not None else False,
        "configured_bytes": configured,
        "error": "; ".join(reader.errors) or None,
    }


@dataclass
class _Proc:
    """What the fact command printed about one QEMU process."""

    comm: str
    cmdline: str | None = None
    merging: list[str] = field(default_factory=list)
    stat: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)


Files = dict[str, list[str]]  # file name → its lines, as the fact command printed them


def _pid_files(lines: Files) -> dict[str, int | str]:
    """
    ``<vmid>.pid`` of the run directory (qemu-server src/PVE/QemuServer/Helpers.pm
    vm_pidfile_name) by VMID: the pid on its first line, or that line when it is not a pid (the
    first line must be digits: instance_running_locally). Other *.pid files are not VMs'.
    """
    found: dict[str, int | str] = {}
    for name, content in lines.items():
        vm = _VM_PIDFILE.fullmatch(name)
        if vm:
            first = content[0].strip()
            found[vm.group(1)] = int(first) if re.fullmatch(r"[0-9]+", first) else first
    return found


def _vm_of(pid: int, pidfile: str | None, pids: dict[str, int | str]) -> tuple[str | None, str]:
    """
    The VMID of a QEMU process, as qemu-server tells (``check_running``): its ``-pidfile`` is
    ``<run dir>/<vmid>.pid`` and that file holds its pid. A pid file that holds no pid names the
    VM anyway, with the error; without a pid file qemu-server counts the VM as stopped.
    """
    match = re.fullmatch(re.escape(PVE_PID_DIR) + r"/(\d+)\.pid", pidfile or "")
    content = pids.get(match.group(1)) if match else None
    if match is None or content is None:
        return None, ""
    if isinstance(content, int):
        return (match.group(1), "") if content == pid else (None, "")
    return match.group(1), f"{pidfile}: {content!r} is not a pid"


def _proc_lines(lines: list[str]) -> tuple[dict[int, _Proc], Files, Files]:
    """Sort the ``## vms`` lines into processes, run-directory *.pid files and configs."""
    procs: dict[int, _Proc] = {}
    run_files: Files = {}
    conf_lines: Files = {}
    for line in lines:
        match = _PROC.fullmatch(line)
        if match:
            pid, what, value = int(match.group(1)), match.group(2), match.group(3)
            if what == "comm":
                procs.setdefault(pid, _Proc(value))
                continue
            if pid not in procs:
                raise parse_error(line, "a VM line before its comm")
            proc = procs[pid]
            if what == "cmdline":
                proc.cmdline = value
            elif what == "ksm_merging_pages":
                proc.merging.append(value)
            elif what == "ksm_stat":
                proc.stat.append(value)
            else:
                proc.status.append(value)
            continue
        match = _RUN_FILE.fullmatch(line) or _CONF.fullmatch(line)
        if match is None:
            raise parse_error(line, "a VM line")
        files = run_files if line.startswith(PVE_PID_DIR) else conf_lines
        files.setdefault(match.group(1), []).append(match.group(2))
    return procs, run_files, conf_lines


def _read(errors: list[str], where: str, read: Any, *args: Any) -> Any:
    """``read(*args)``, or None with the VmFileError noted in ``errors`` under ``where``."""
    try:
        return read(*args)
    except VmFileError as error:
        errors.append(f"{where}: {error}")
        return None


def _merging_pages(lines: list[str]) -> int | None:
    if not lines:
        return None
    if not re.fullmatch(r"\d+", lines[0].strip()):
        raise VmFileError(f"{lines[0]!r} is not a page count")
    return int(lines[0])


def parse_vms(lines: list[str], page_size: int) -> tuple[list[Vm], dict[str, PveConfig]]:
    """
    The ``## vms`` lines: the running QEMU processes, and the Proxmox VE configs by VMID.

    A process that exited between listing and reading (empty cmdline) is left out; a pid file
    whose process is gone, and files of the run directory other than ``<vmid>.pid``, are ignored.
    What one VM's files hold never fails the fact: what cannot be read goes to that VM's
    ``error`` (and its config's), the rest is read. Lines the command cannot print still do.
    """
    procs, run_files, conf_lines = _proc_lines(lines)
    pids = _pid_files(run_files)
    configs: dict[str, PveConfig] = {}
    for name, text in sorted(conf_lines.items(), key=lambda item: _by_id(item[0])):
        vmid_match = _VM_CONF.fullmatch(name)
        if vmid_match:  # pmxcfs names configs <vmid>.conf; anything else is no VM's
            config = parse_pve_config(text)
            if config["error"]:
                config["error"] = f"{PVE_CONF_DIR}/{name}: {config['error']}"
            configs[vmid_match.group(1)] = config
    for vmid, content in pids.items():
        if isinstance(content, str) and vmid in configs:
            note = f"{PVE_PID_DIR}/{vmid}.pid: {content!r} is not a pid"
            old = configs[vmid]["error"]
            configs[vmid]["error"] = f"{old}; {note}" if old else note
    vms: list[Vm] = []
    for pid, proc in sorted(procs.items()):
        args = proc.cmdline.split("\t") if proc.cmdline else []
        if not args:
            continue  # exited while being read, or a kernel thread of that name
        vms.append(_vm(pid, proc, args, pids, configs, page_size))
    return vms, configs


def _vm(
    pid: int,
    proc: _Proc,
    args: list[str],
    pids: dict[str, int | str],
    configs: dict[str, PveConfig],
    page_size: int,
) -> Vm:
    """One running VM from its process's lines, its pid file and its config."""
    errors: list[str] = []
    cmdline = parse_cmdline(args)
    errors += [f"/proc/{pid}/cmdline: {error}" for error in cmdline["errors"]]
    stat = _read(errors, f"/proc/{pid}/ksm_stat", parse_ksm_stat, proc.stat) or {}
    merging = _read(errors, f"/proc/{pid}/ksm_merging_pages", _merging_pages, proc.merging)
    merging = stat.get("ksm_merging_pages") if merging is None else merging
    rss = _read(errors, f"/proc/{pid}/status", parse_vm_rss, proc.status)
    vmid, pidfile_error = _vm_of(pid, cmdline["pidfile"], pids)
    config = configs.get(vmid) if vmid else None
    if config and config["error"]:
        errors.append(config["error"])  # it names a bad pid file of the VM too
    elif pidfile_error:
        errors.append(pidfile_error)
    allow_ksm = config["allow_ksm"] if config else None
    mem_merge = cmdline["mem_merge"]
    return {
        "pid": pid,
        "vmid": vmid,
        "name": (config["name"] if config else None) or cmdline["name"],
        "uuid": cmdline["uuid"],
        "merged_pages": merging,
        "merged_bytes": None if merging is None else merging * page_size,
        "ksm_zero_pages": stat.get("ksm_zero_pages"),
        "mem_merge": mem_merge,
        "allow_ksm": allow_ksm,
        "restart_pending": None not in (allow_ksm, mem_merge) and allow_ksm != mem_merge,
        "rss_bytes": rss,
        "configured_bytes": config["configured_bytes"] if config else cmdline["memory_bytes"],
        "error": "; ".join(errors) or None,
    }


def _by_id(name: str) -> tuple[int, str]:
    digits = re.match(r"\d+", name)
    return (int(digits.group(0)) if digits else -1, name)
