"""The host's KSM state as typed structures, and the names every layer shares (enums, options)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Literal, NotRequired, Protocol, TypedDict

DEFAULT_MAX_FRACTION = 0.5

KSM_DIR = "/sys/kernel/mm/ksm"
RUN_PATH = f"{KSM_DIR}/run"
# The bits of /sys/kernel/mm/ksm/run (Linux mm/ksm.c, KSM_RUN_*; read at torvalds/linux
# bf4b87e84591): run_store() takes 0, 1 or 2 only; ksm_memory_callback() ORs KSM_RUN_OFFLINE in
# while memory is going offline (MEM_GOING_OFFLINE) and clears it afterwards, and run_show()
# prints the whole word. So run reads 0, 1, 2, 4, 5 or 6, and ksmd merges when the MERGE bit is
# set (ksmd_should_run: ksm_run & KSM_RUN_MERGE), offline bit or not.
KSM_RUN_MERGE = 1
KSM_RUN_UNMERGE = 2
KSM_RUN_OFFLINE = 4
KSM_RUN_VALUES = frozenset(
    mode | offline
    for mode in (0, KSM_RUN_MERGE, KSM_RUN_UNMERGE)
    for offline in (0, KSM_RUN_OFFLINE)
)
UNITS = ("ksmtuned.service", "ksm.service")
PERSIST_PATH = "/etc/tmpfiles.d/ksm-guard.conf"
PERSIST_LINE = f"w {RUN_PATH} - - - - 0"
# Proxmox VE 9's qemu-server added the per-VM opt-out (``allow-ksm``) in this version.
ALLOW_KSM_SINCE = (9, 0, 27)


class Mode(StrEnum):
    """What ksm-guard does to a host."""

    AUDIT = "audit"
    DISABLE = "disable"
    UNMERGE = "unmerge"
    ENABLE = "enable"
    VM_OPTOUT = "vm-optout"


class Policy(StrEnum):
    """What compliance asks of a host (``--policy``, host data ``ksm_policy``)."""

    HOST = "host"  # KSM off host-wide: ksmd stopped, units off, nothing merged
    STRICT = "strict"  # also every VM opted out (where a per-VM opt-out exists)


class Verdict(StrEnum):
    """A host's compliance, in order of severity."""

    COMPLIANT = "compliant"
    UNSUPPORTED = "unsupported"
    WAIVED = "waived"  # exposed, but under a waiver that has not expired
    VM_RESTART_PENDING = "vm-restart-pending"  # strict: a VM runs with KSM until a stop/start
    VM_KSM_ALLOWED = "vm-ksm-allowed"  # strict: a VM is configured with KSM allowed
    MERGED_PAGES_REMAIN = "merged-pages-remain"
    SERVICE_ENABLED = "service-enabled"
    KSM_RUNNING = "ksm-running"
    UNREACHABLE = "unreachable"
    ERROR = "error"

    @property
    def exposed(self) -> bool:
        """KSM merges, or could merge again, on this host (audit exit code 1)."""
        return self in (
            Verdict.VM_RESTART_PENDING,
            Verdict.VM_KSM_ALLOWED,
            Verdict.MERGED_PAGES_REMAIN,
            Verdict.SERVICE_ENABLED,
            Verdict.KSM_RUNNING,
        )

    @property
    def unread(self) -> bool:
        """The host's state could not be read (exit code 3)."""
        return self in (Verdict.UNREACHABLE, Verdict.ERROR)


class Status(StrEnum):
    """What a run did (or, in a dry run, would do) to a host."""

    OK = "ok"  # nothing to change
    WOULD_CHANGE = "would-change"  # dry run or prompt: the plan has steps
    CHANGED = "changed"
    REFUSED = "refused"  # a preflight refused the host: nothing ran on it
    FAILED = "failed"  # a command failed while changing the host
    NOT_REACHED = "not-reached"  # the rollout stopped before this host's batch
    WAIVED = "waived"  # under a waiver: changing modes leave it as it is
    UNREACHABLE = "unreachable"
    ERROR = "error"  # connected, but the state could not be read


class Unit(TypedDict):
    """``systemctl show`` of one unit: LoadState, ActiveState, UnitFileState."""

    load: str
    active: str
    unit_file: str


class PveConfig(TypedDict):
    """
    What a Proxmox VE VM config (``/etc/pve/qemu-server/<vmid>.conf``) says about KSM and memory,
    read as qemu-server 9.2.6 reads it (its main section and ``[PENDING]``).
    """

    name: str | None
    allow_ksm: bool  # whether the VM starts with KSM allowed next (allow-ksm and args combined)
    lock: str | None  # qemu-server's lock (backup, migrate, snapshot, suspended, ...); None: none
    template: bool  # ``template: 1``
    configured_bytes: int | None  # ``memory`` (MiB, default 512); None: unreadable
    error: str | None  # what of this VM's config or pid file could not be read; None: all read


class SharedWith(TypedDict):
    """Another VM a VM shares physical KSM pages with (audit --sharing)."""

    pid: int
    vmid: str | None
    name: str | None
    bytes: int  # distinct physical KSM pages both map, times the page size


class Vm(TypedDict):
    """A running QEMU process and its merged memory."""

    pid: int
    vmid: str | None
    name: str | None
    uuid: str | None
    merged_pages: int | None
    merged_bytes: int | None
    ksm_zero_pages: int | None
    mem_merge: bool | None  # QEMU's mem-merge as the process runs; None: unreadable
    allow_ksm: bool | None
    restart_pending: bool
    rss_bytes: int | None  # VmRSS of /proc/PID/status; None: unreadable
    configured_bytes: int | None  # the most the VM can use: config memory, else QEMU's -m
    error: str | None  # what of this VM's files could not be read; None: all read
    # audit --sharing only (operations/sharing.py); None where the scan could not read the VM
    shared_with: NotRequired[list[SharedWith] | None]
    shared_with_other_bytes: NotRequired[int | None]
    merged_within_bytes: NotRequired[int | None]
    ksm_mapped_bytes: NotRequired[int | None]
    tenant: NotRequired[str | None]
    tenant_source: NotRequired[str | None]  # "pool" or "tag"
    sharing_error: NotRequired[str | None]


class HostKey(TypedDict):
    """One SSH host key as ``ssh-keygen -lf`` reports it on the host (None: it could not)."""

    path: str
    bits: int | None
    fingerprint: str | None  # SHA256:...
    comment: str | None
    type: str | None  # ED25519, RSA, ECDSA, ...


class Evidence(TypedDict):
    """Who answered the fact command, and when: read on the host, in the same command."""

    time: str  # the host's clock, UTC, ISO 8601 (2025-01-31T12:00:00Z)
    hostname: str  # uname -n
    kernel: str  # uname -r
    machine_id: str | None  # /etc/machine-id; None: absent or empty
    boot_id: str | None  # /proc/sys/kernel/random/boot_id
    ssh_keygen: bool  # False: no ssh-keygen on the host, so no fingerprints
    host_keys: list[HostKey]  # /etc/ssh/ssh_host_*_key.pub, in glob order


class LibvirtDomain(TypedDict):
    """
    A libvirt QEMU domain's KSM opt-out, ``<memoryBacking><nosharepages/>`` (libvirt's
    counterpart of Proxmox VE's ``allow-ksm: 0``), from its files under /run/libvirt/qemu and
    /etc/libvirt/qemu.
    """

    pid: int | None  # the running QEMU's pid, from <name>.pid; None: not running
    persistent: bool | None  # it has a persistent definition; None: cannot be told
    nosharepages: bool | None  # the definition it starts with next opts out; None: unread
    error: str | None  # what of its files could not be read; None: all read


class ClusterInfo(TypedDict):
    """
    The host's Proxmox VE cluster as its own ``/etc/pve/.members`` says (operations/cluster.py):
    the capacity plan's pool and the node name ``qm migrate`` wants.
    """

    name: str | None  # the cluster's name; None: a node in no cluster (a cluster of one)
    node: str | None  # the node's own name; None: the file could not be read
    error: str | None  # why the file could not be read or parsed; None: read


# Every file of /sys/kernel/mm/ksm by name; ``run`` is always there.
Ksm = dict[str, int | str]
Persist = Literal["present", "absent", "modified"]


class WatchState(TypedDict):
    """The ``watch`` fact section: the watch's files and what its last run recorded."""

    now: int  # the host's clock, seconds since the epoch
    files: dict[str, str]  # path → SHA-256 of each watch file present
    last_run: int | None  # seconds since the epoch; None: never ran
    heals: int
    interval: int | None
    textfile: str | None  # the metrics file its last run wrote


class HostState(TypedDict):
    """
    The ``KsmHost`` fact: a host's whole KSM picture from one remote command.

    Later fact sections add ``NotRequired`` keys, present only when the output has the section:
    fixtures captured before a section existed still parse to the same value.
    """

    uid: int
    page_size: int
    mem_total: int
    mem_available: int
    ksm: Ksm | None  # None: the kernel has no KSM
    systemd: bool
    units: dict[str, Unit]
    persist: Persist
    qemu_server: str | None  # the installed qemu-server version; None: not Proxmox VE
    vms: list[Vm]
    pve_configs: dict[str, PveConfig]
    evidence: NotRequired[Evidence]  # the ``evidence`` section (operations/evidence.py)
    # libvirt's QEMU domains by name (operations/libvirt.py); None: no libvirt on the host.
    libvirt_domains: NotRequired[dict[str, LibvirtDomain] | None]
    # audit --sharing: the cross-VM sharing map's host part (operations/sharing.py apply_scan)
    sharing: NotRequired[dict[str, Any]]
    # the Proxmox VE cluster (operations/cluster.py); None: no /etc/pve/.members on the host.
    cluster: NotRequired[ClusterInfo | None]
    watch: NotRequired[WatchState]  # the drift watch's files and last run (operations/watch.py)


@dataclass(frozen=True)
class Waiver:
    """Host data ``ksm_waiver``: KSM stays on here on purpose, approved, until ``expires``."""

    reason: str
    approved_by: str
    expires: date  # the last day it holds (UTC, inclusive)

    def active(self, today: date) -> bool:
        return today <= self.expires


def utc_today() -> date:
    return datetime.now(UTC).date()


@dataclass(frozen=True)
class Options:
    """How a mode runs on a host: host data ``ksm_mask``, ``ksm_force``, ... or CLI options."""

    mask: bool = False
    force: bool = False
    max_fraction: float = DEFAULT_MAX_FRACTION
    vmids: tuple[int, ...] = ()
    policy: Policy = Policy.HOST
    waiver: Waiver | None = None
    ignore_waivers: bool = False  # change waived hosts too
    # The drift watch (operations/watch.py): installed by disable and unmerge when asked for.
    watch: bool = False
    watch_interval: int = 300  # seconds between runs
    watch_heal: bool = False  # on drift: run=0, units stopped and disabled
    watch_textfile_dir: str = "/var/lib/prometheus/node-exporter"
    watch_host: str = ""  # the ``host`` label, fixed at install (the inventory name)


class SettingsError(ValueError):
    """A host's ksm-guard settings (``ksm_mode``, ``ksm_*`` data) are wrong: one line."""


def _flag(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{key} must be true or false, not {value!r}")


def _fraction(value: object) -> float:
    try:
        fraction = float(str(value))
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise SettingsError(f"ksm_max_fraction must be a number in (0, 1], not {value!r}")
    return fraction


def _vmids(value: object) -> tuple[int, ...]:
    """VMIDs from a list or a comma-separated string (``--data ksm_vmids=100,101``)."""
    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    try:
        vmids = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        vmids = (0,)
    if any(not 100 <= vmid <= 999_999_999 for vmid in vmids):
        raise SettingsError(f"ksm_vmids must be Proxmox VE VMIDs (100 to 999999999), not {value!r}")
    return vmids


class HostData(Protocol):
    """The part of pyinfra's host data ksm-guard reads (anything with ``get``)."""

    def get(self, key: str, default: Any = None) -> Any: ...


def host_label(name: str) -> str:
    """The ``host`` label: the inventory name, or this machine's hostname for ``@local``."""
    return socket.gethostname() if name == "@local" else name


def settings_from_data(data: HostData, name: str = "") -> tuple[Mode, Options]:
    """The mode (``ksm_mode``, default audit) and options a host's data asks for; ``name``,
    the inventory name, gives the drift watch's ``host`` label."""
    raw = str(data.get("ksm_mode", Mode.AUDIT.value))
    try:
        mode = Mode(raw)
    except ValueError:
        choices = ", ".join(mode.value for mode in Mode)
        raise SettingsError(f"unknown ksm_mode {raw!r}: choose one of {choices}") from None
    options = Options(
        mask=_flag("ksm_mask", data.get("ksm_mask", False)),
        force=_flag("ksm_force", data.get("ksm_force", False)),
        max_fraction=_fraction(data.get("ksm_max_fraction", DEFAULT_MAX_FRACTION)),
        vmids=_vmids(data.get("ksm_vmids", ())),
        policy=_policy(data.get("ksm_policy", Policy.HOST.value)),
        waiver=_waiver(data.get("ksm_waiver")),
        ignore_waivers=_flag("ksm_ignore_waivers", data.get("ksm_ignore_waivers", False)),
        watch=_flag("ksm_watch", data.get("ksm_watch", False)),
        watch_interval=_interval(data.get("ksm_watch_interval", 300)),
        watch_heal=_flag("ksm_watch_heal", data.get("ksm_watch_heal", False)),
        watch_textfile_dir=_directory(
            data.get("ksm_watch_textfile_dir", "/var/lib/prometheus/node-exporter")
        ),
        watch_host=host_label(name) if name else "",
    )
    return mode, options


def _interval(value: object) -> int:
    """Seconds between watch runs: a whole number from 10 to one day."""
    try:
        seconds = int(str(value).strip())
    except ValueError:
        seconds = 0
    if not 10 <= seconds <= 86400:
        raise SettingsError(
            f"ksm_watch_interval must be whole seconds from 10 to 86400, not {value!r}"
        )
    return seconds


def _directory(value: object) -> str:
    """An absolute directory path without whitespace or shell-special quoting trouble."""
    text = str(value)
    if not text.startswith("/") or any(c.isspace() or c in "'\"$`\\%" for c in text):
        raise SettingsError(
            f"ksm_watch_textfile_dir must be an absolute path without spaces or quotes, "
            f"not {value!r}"
        )
    return text.rstrip("/") or "/"


def _policy(value: object) -> Policy:
    try:
        return Policy(str(value))
    except ValueError:
        choices = ", ".join(policy.value for policy in Policy)
        raise SettingsError(f"unknown ksm_policy {value!r}: choose one of {choices}") from None


_WAIVER_KEYS = ("reason", "approved_by", "expires")


def _waiver(value: object) -> Waiver | None:
    """``{"reason": ..., "approved_by": ..., "expires": "YYYY-MM-DD"}`` (a dict, or its JSON)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    example = '{"reason": ..., "approved_by": ..., "expires": "YYYY-MM-DD"}'
    if not isinstance(value, dict) or sorted(value) != sorted(_WAIVER_KEYS):
        raise SettingsError(f"ksm_waiver must be {example}, not {value!r}")
    reason, approved_by = str(value["reason"]).strip(), str(value["approved_by"]).strip()
    if not reason or not approved_by:
        raise SettingsError("ksm_waiver needs a reason and who approved it")
    try:
        expires = date.fromisoformat(str(value["expires"]))
    except ValueError:
        raise SettingsError(
            f"ksm_waiver expires must be a date YYYY-MM-DD, not {value['expires']!r}"
        ) from None
    return Waiver(reason, approved_by, expires)
