"""Build, boot, snapshot and drive the Debian 12 QEMU guests of ksm-guard's integration tests."""

# Layout of the cache (``$KSM_GUARD_VM_CACHE``, default ``~/.cache/ksm-guard/vm``)::
#
#     id_ed25519[.pub]         the suite's SSH key, accepted by root, admin and nosudo
#     debs/                    debootstrap's package cache
#     <recipe hash>/           one published build (atomic rename of a temp dir)
#         vmlinux initrd.img   ELF kernel extracted from Debian's bzImage, small initrd
#         debian.raw pve.raw bare.raw   one ext4 image per flavour
#         snapshots/<flavour>-<MiB>m-<vCPUs>c-<key>.qcow2   booted guest saved by ``savevm``
#
# The recipe hash covers the source between the ``image recipe`` markers below, the
# public key and ``qemu-system-x86_64 --version``; a snapshot's key covers the machine's
# command line and the source of ``VmSession._make_snapshot``. Per session, guests run from
# copies of the snapshot overlay in a temp dir (``/tmp/ksm-guard-vms-*``); they are stopped by
# the PID in their pidfile (context manager, atexit, SIGTERM/SIGHUP), and VMs of sessions whose
# owner died are reaped by the next session or ``python -m tests.vm.harness reap``.
#
# Environment: ``KSM_GUARD_VM_CACHE`` (cache dir), ``KSM_GUARD_VM_ACCEL`` (``kvm``/``tcg``,
# skips the probe).

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FLAVOURS = ("debian", "pve", "bare")
USERS = ("root", "admin", "nosudo")
DEFAULT_MEMORY_MIB = 1024
DEFAULT_VCPUS = 2
SNAPSHOT_TAG = "booted"
KSMTUNED_FIRST_ADJUST_S = 60  # debian flavour: restored guests read run=1 for about this long
KSM_SYSFS = "/sys/kernel/mm/ksm"
QEMU = "qemu-system-x86_64"
SESSION_PREFIX = "ksm-guard-vms-"
WORKLOAD_SCRIPT = Path(__file__).with_name("workload.py")
GUEST_WORKLOAD_PATH = "/var/tmp/ksm-guard-workload.py"

COLD_BOOT_TIMEOUT_S = 240.0
RESTORE_TIMEOUT_S = 90.0
LOCK_TIMEOUT_S = 1800.0
# TCG cold boots in parallel thrash 2 host cores (3 at once: 120 s each instead of 25 s).
COLD_BOOT_SLOTS = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) // DEFAULT_VCPUS))
KEPT_BUILDS = 2  # each recipe change leaves ~2 GB behind: keep the most recently used ones
CONSOLE_TAIL_LINES = 40

HostEntry = tuple[str, dict[str, Any]]


class VmError(RuntimeError):
    """A VM could not be built, started, reached or stopped."""


class GuestCommandError(subprocess.CalledProcessError):
    """A command run over SSH in a guest exited non-zero."""

    def __init__(self, guest: str, user: str, proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.guest = guest
        self.user = user

    def __str__(self) -> str:
        remote = self.cmd[-1] if isinstance(self.cmd, list) else self.cmd
        return (
            f"{self.user}@{self.guest}: {remote!r} exited {self.returncode}\n"
            f"stdout: {_tail(self.stdout or '', 20)}\nstderr: {_tail(self.stderr or '', 20)}"
        )


_T0 = time.monotonic()


def log(message: str) -> None:
    """Print a progress line with the time since import to stderr."""
    print(f"[ksm-guard-vm {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log how long the block took (and record it in ``timings``)."""
    start = time.monotonic()
    log(f"{what} ...")
    yield
    elapsed = time.monotonic() - start
    if timings is not None:
        timings[what] = round(elapsed, 2)
    log(f"{what}: {elapsed:.1f}s")


def _tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def cache_root() -> Path:
    """Return the cache directory (created if missing)."""
    default = Path.home() / ".cache" / "ksm-guard" / "vm"
    root = Path(os.environ.get("KSM_GUARD_VM_CACHE") or default).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def qemu_version() -> str:
    """Return the first line of ``qemu-system-x86_64 --version``."""
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; give up after ``timeout`` seconds."""
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VmError(f"timed out after {timeout:.0f}s waiting for {path}") from None
                if not announced:
                    log(f"waiting for {path} (another build or snapshot in progress)")
                    announced = True
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_key() -> Path:
    """Generate the suite's ed25519 key once into the cache dir and return its path."""
    root = cache_root()
    key = root / "id_ed25519"
    if key.exists() and key.with_suffix(".pub").exists():
        return key
    with _locked(root / ".lock"):
        if not key.exists():
            tmp = root / f".id_ed25519.{os.getpid()}"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ksm-guard-tests", "-f", tmp],
                check=True,
            )
            tmp.with_suffix(tmp.suffix + ".pub").rename(key.with_suffix(".pub"))
            tmp.rename(key)
    return key


# ----- image recipe begin (this text is hashed into the cache key) -----

SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "python3",
    "sudo",
    "ksmtuned",
    "linux-image-amd64",
    "initramfs-tools",
    "iproute2",
    "procps",
    "kmod",
    "zstd",
    "e2fsprogs",
)
IMAGE_SIZE = "2G"
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
PRUNED_MODULE_TREES = (
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "drivers/isdn",
    "drivers/usb",
    "drivers/scsi",
    "drivers/iio",
    "net/bluetooth",
    "net/wireless",
    "net/mac80211",
    "arch/x86/crypto",
    "drivers/cpufreq",
    "drivers/input",
    "drivers/hwmon",
    "drivers/edac",
)
BLACKLISTED_MODULES = (
    "kvm",
    "kvm_intel",
    "kvm_amd",
    "drm",
    "floppy",
    "pcspkr",
    "iTCO_wdt",
    "lpc_ich",
    "intel_pmc_bxt",
)
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "modprobe@drm.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "getty@tty1.service",
    "systemd-networkd-wait-online.service",
    "systemd-sysusers.service",
    "modprobe@dm_mod.service",
    "modprobe@loop.service",
    "modprobe@fuse.service",
    "modprobe@efi_pstore.service",
)
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}
# Proxmox's ksm-control-daemon unit: forking, reload by SIGUSR1, and no ExecStop.
PVE_KSMTUNED_UNIT = """\
[Unit]
Description=Kernel Samepage Merging (KSM) Tuning Daemon
After=syslog.target

[Service]
ExecStart=/usr/sbin/ksmtuned
ExecReload=/bin/kill -USR1 $MAINPID
Type=forking

[Install]
WantedBy=multi-user.target
"""
# Makes ksmtuned write run=1 within seconds of boot, like a loaded Proxmox node.
PVE_KSMTUNED_TUNING = """\
# ksm-guard test VM: switch KSM on within seconds, as on a busy Proxmox node.
KSM_MONITOR_INTERVAL=2
KSM_THRES_COEF=95
KSM_NPAGES_BOOST=5000
KSM_NPAGES_MAX=5000
KSM_SLEEP_MSEC=1
"""
PVE_PACKAGE_CONTROL = """\
Package: ksm-control-daemon
Version: 1.5-1
Architecture: all
Maintainer: ksm-guard test harness <root@localhost>
Depends: bash, procps
Conflicts: ksmtuned
Section: admin
Priority: optional
Description: Kernel Samepage Merging tuning daemon (ksm-guard test stand-in)
 Mimics Proxmox VE's ksm-control-daemon: ksmtuned with a single ksmtuned.service.
"""
PVE_PACKAGE_SCRIPTS = {
    "postinst": (
        '#!/bin/sh\nset -e\nif [ "$1" = configure ]; then\n'
        "    deb-systemd-helper enable ksmtuned.service >/dev/null || true\nfi\n"
    ),
    "prerm": (
        '#!/bin/sh\nset -e\nif [ "$1" = remove ] && [ -d /run/systemd/system ]; then\n'
        "    deb-systemd-invoke stop ksmtuned.service >/dev/null || true\nfi\n"
    ),
    "postrm": (
        '#!/bin/sh\nset -e\nif [ "$1" = purge ] && [ -x /usr/bin/deb-systemd-helper ]; then\n'
        "    deb-systemd-helper purge ksmtuned.service >/dev/null || true\nfi\n"
    ),
}
WANTS = "etc/systemd/system/multi-user.target.wants"


def _run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None) -> str:
    """Run a build command; raise VmError with its output tail when it fails."""
    args = [str(part) for part in cmd]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise VmError(
            f"command failed ({proc.returncode}): {shlex.join(args)}\n"
            f"{_tail(proc.stdout + proc.stderr)}"
        )
    return proc.stdout


def _chroot(root: Path, *cmd: str) -> str:
    """Run a command inside the image tree."""
    return _run(["chroot", root, *cmd], env=CHROOT_ENV)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` with ``mode``, creating parent dirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _apt_source_stanzas() -> Iterator[tuple[str, list[str]]]:
    """Yield (URI, suites) of the enabled ``deb`` sources in the host's apt config."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()
        elif path.name == "sources.list" or path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]


def debian_mirror() -> str:
    """Return the Debian archive URL that apt uses on this machine."""
    stanzas = list(_apt_source_stanzas())
    for uri, suites in stanzas:
        if SUITE in suites:
            return uri
    for uri, suites in stanzas:
        if any(s.isalpha() for s in suites) and "security" not in uri:
            return uri  # a main archive of another release also serves bookworm
    raise VmError("no Debian mirror found in /etc/apt/sources.list{,.d/*}")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside an xz-compressed bzImage."""
    magic = b"\xfd7zXZ\x00"
    start = bzimage.find(magic)
    while start != -1:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(magic, start + 1)
    raise VmError("no xz-compressed ELF kernel found in the bzImage")


def _kernel_version(root: Path) -> str:
    """Return the single kernel version installed in the tree."""
    versions = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(versions) != 1:
        raise VmError(f"expected one kernel in the image, found {versions}")
    return versions[0]


def _add_user(root: Path, user: str, pubkey: str) -> None:
    """Create ``user`` (no password, not locked) accepting ``pubkey``."""
    if user == "root":
        home = root / "root"
    else:
        _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", user)
        home = root / "home" / user
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    _write(ssh_dir / "authorized_keys", pubkey, 0o600)
    _chroot(root, "chown", "-R", f"{user}:{user}", f"/{home.relative_to(root)}/.ssh")


def _customise_base(root: Path, pubkey: str) -> None:
    """Network, SSH, users, boot-speed trims and a small initrd, common to all flavours."""
    _write(root / "etc/hostname", "ksm-guard-test\n")
    _write(root / "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 ksm-guard-test\n")
    _write(root / "etc/fstab", "/dev/vda / ext4 rw,relatime 0 0\n")
    _write(root / "etc/resolv.conf", "nameserver 10.0.2.3\n")
    _write(
        root / "etc/systemd/network/80-ksm-guard-dhcp.network",
        # QEMU's user network is fixed: a static address skips the DHCP round trip.
        "[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n"
        "DNS=10.0.2.3\n",
    )
    _write(
        root / "etc/ssh/sshd_config.d/ksm-guard.conf",
        "UseDNS no\nPermitRootLogin prohibit-password\n",
    )
    pam_sshd = root / "etc/pam.d/sshd"  # pam_motd runs scripts at every login: slow under TCG
    pam_sshd.write_text(
        re.sub(r"(?m)^session\s+optional\s+pam_motd\.so.*$", r"# \g<0>", pam_sshd.read_text())
    )
    _chroot(root, "systemctl", "enable", "systemd-networkd.service")
    _chroot(root, "systemctl", "mask", *MASKED_UNITS)
    for user in USERS:
        _add_user(root, user, pubkey)
    _write(root / "etc/sudoers.d/ksm-guard-admin", "admin ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440)
    _write(
        root / "etc/modprobe.d/ksm-guard-blacklist.conf",
        "".join(f"blacklist {name}\n" for name in BLACKLISTED_MODULES),
    )
    version = _kernel_version(root)
    for tree in PRUNED_MODULE_TREES:
        shutil.rmtree(root / "lib/modules" / version / "kernel" / tree, ignore_errors=True)
    _chroot(root, "depmod", "-a", version)
    conf = root / "etc/initramfs-tools/initramfs.conf"
    conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text()))
    with open(root / "etc/initramfs-tools/modules", "a") as modules:
        modules.write("".join(f"{name}\n" for name in INITRD_MODULES))
    _chroot(root, "update-initramfs", "-u", "-k", version)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def _build_pve_package(base: Path, out: Path) -> Path:
    """Build a ksm-control-daemon .deb from Debian's ksmtuned script, as Proxmox ships it."""
    pkg = out / "ksm-control-daemon"
    _write(pkg / "usr/sbin/ksmtuned", (base / "usr/sbin/ksmtuned").read_text(), 0o755)
    _write(pkg / "etc/ksmtuned.conf", (base / "etc/ksmtuned.conf").read_text())
    _write(pkg / "usr/lib/systemd/system/ksmtuned.service", PVE_KSMTUNED_UNIT)
    _write(pkg / "DEBIAN/control", PVE_PACKAGE_CONTROL)
    _write(pkg / "DEBIAN/conffiles", "/etc/ksmtuned.conf\n")
    for name, script in PVE_PACKAGE_SCRIPTS.items():
        _write(pkg / "DEBIAN" / name, script, 0o755)
    deb = out / "ksm-control-daemon_1.5-1_all.deb"
    _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", pkg, deb])
    return deb


def _customise_flavour(root: Path, flavour: str, pve_deb: Path) -> None:
    """Turn a copy of the base tree into ``flavour`` and check the resulting unit layout."""
    if flavour in ("pve", "bare"):
        _chroot(root, "dpkg", "--purge", "ksmtuned")
    if flavour == "pve":
        shutil.copy(pve_deb, root / "tmp/ksm-control-daemon.deb")
        _chroot(root, "dpkg", "-i", "/tmp/ksm-control-daemon.deb")
        (root / "tmp/ksm-control-daemon.deb").unlink()
        with open(root / "etc/ksmtuned.conf", "a") as conf:
            conf.write(PVE_KSMTUNED_TUNING)
    expected = {
        "debian": {"ksm.service": True, "ksmtuned.service": True},
        "pve": {"ksm.service": False, "ksmtuned.service": True},
        "bare": {"ksm.service": False, "ksmtuned.service": False},
    }[flavour]
    for unit, present in expected.items():
        for path in (root / "usr/lib/systemd/system" / unit, root / WANTS / unit):
            if os.path.lexists(path) != present:
                raise VmError(f"flavour {flavour}: {path} should {'' if present else 'not '}exist")


def _build_images(dest: Path, pubkey: str, debs: Path, timings: dict[str, float]) -> None:
    """Build kernel, initrd and one ext4 image per flavour into ``dest``."""
    base = dest / "rootfs"
    mirror = debian_mirror()
    with timed(f"debootstrap {SUITE} from {mirror}", timings):
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--cache-dir={debs}",
                SUITE,
                base,
                mirror,
            ]
        )
    with timed("customise base tree", timings):
        _customise_base(base, pubkey)
        version = _kernel_version(base)
        (dest / "vmlinux").write_bytes(
            extract_vmlinux((base / f"boot/vmlinuz-{version}").read_bytes())
        )
        shutil.copy(base / f"boot/initrd.img-{version}", dest / "initrd.img")
        pve_deb = _build_pve_package(base, dest)
    for flavour in FLAVOURS:
        last = flavour == FLAVOURS[-1]
        tree = base if last else dest / f"tree-{flavour}"
        with timed(f"flavour {flavour}: copy, customise, mkfs.ext4", timings):
            if not last:
                _run(["cp", "-a", base, tree])
            _customise_flavour(tree, flavour, pve_deb)
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    "ksmguard",
                    "-d",
                    tree,
                    dest / f"{flavour}.raw",
                    IMAGE_SIZE,
                ]
            )
            shutil.rmtree(tree)
    shutil.rmtree(dest / "ksm-control-daemon", ignore_errors=True)
    (dest / "snapshots").mkdir()
    (dest / "manifest.json").write_text(
        json.dumps(
            {"kernel": version, "mirror": mirror, "flavours": FLAVOURS, "timings": timings},
            indent=2,
        )
    )


# ----- image recipe end -----


def _recipe_text() -> str:
    """Return the image recipe: this module's source between the recipe markers."""
    source = Path(__file__).read_text()
    begin = source.index("# ----- image recipe begin")
    end = source.index("# ----- image recipe end")
    return source[begin:end]


def recipe_hash(pubkey: str) -> str:
    """Hash the recipe, the flavour list, the public key and QEMU's version."""
    digest = hashlib.sha256()
    for part in (_recipe_text(), ",".join(FLAVOURS), pubkey, qemu_version()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ImagePaths:
    """Where the cached artefacts of one published build live."""

    root: Path
    kernel: Path
    initrd: Path
    disk: Path
    key: Path
    flavour: str

    @property
    def snapshots(self) -> Path:
        """Directory of saved, booted guests."""
        return self.root / "snapshots"


def ensure_image(flavour: str = "debian") -> ImagePaths:
    """Build the images once (all flavours) or reuse the cache; return ``flavour``'s paths."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    key = ensure_key()
    pubkey = key.with_suffix(".pub").read_text()
    cache = cache_root()
    root = cache / recipe_hash(pubkey)
    if not (root / "manifest.json").exists():
        with _locked(cache / ".lock"):
            if not (root / "manifest.json").exists():
                _publish_build(cache, root, pubkey)
                _prune_old_builds(cache, root)
    (root / "last-used").touch()
    return ImagePaths(
        root=root,
        kernel=root / "vmlinux",
        initrd=root / "initrd.img",
        disk=root / f"{flavour}.raw",
        key=key,
        flavour=flavour,
    )


def _publish_build(cache: Path, root: Path, pubkey: str) -> None:
    """Build into a temp dir under the cache, then rename it into place."""
    if os.geteuid() != 0:
        raise VmError("building the VM images needs root (debootstrap, chroot)")
    missing = [tool for tool in ("debootstrap", "mkfs.ext4", "qemu-img") if not shutil.which(tool)]
    if missing:
        raise VmError(f"{', '.join(missing)} not found: install debootstrap e2fsprogs qemu-utils")
    for stale in cache.glob(".build-*"):  # we hold the lock: these are from killed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    timings: dict[str, float] = {}
    try:
        with timed(f"build images into {root}", timings):
            (cache / "debs").mkdir(exist_ok=True)
            _build_images(tmp, pubkey, cache / "debs", timings)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_old_builds(cache: Path, current: Path) -> None:
    """Delete published builds beyond the ``KEPT_BUILDS`` most recently used ones."""

    def last_used(build: Path) -> float:
        marker = build / "last-used"
        return marker.stat().st_mtime if marker.exists() else 0.0

    builds = [p for p in cache.iterdir() if (p / "manifest.json").exists() and p != current]
    for old in sorted(builds, key=last_used, reverse=True)[KEPT_BUILDS - 1 :]:
        log(f"removing old build {old}")
        shutil.rmtree(old, ignore_errors=True)


# ----- acceleration -----


def _accel_args(accel: str) -> list[str]:
    """Return QEMU's accelerator and CPU arguments."""
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]


def detect_accel(images: ImagePaths, timeout: float = 20.0) -> str:
    """Return ``kvm`` when a stock kernel really boots under KVM here, else ``tcg``."""
    forced = os.environ.get("KSM_GUARD_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cpu = re.search(r"(?m)^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text())
    host = f"{os.uname().release}|{cpu.group(1) if cpu else '?'}"
    memo = images.root / f"accel-{hashlib.sha256(host.encode()).hexdigest()[:12]}.json"
    if memo.exists():
        return str(json.loads(memo.read_text())["accel"])
    # Boot the kernel without a root disk: with working KVM it panics on the missing root in
    # about a second; kvm_pvm-style KVM hangs, crawls or fails on a stock kernel.
    accel = "tcg"
    with tempfile.TemporaryDirectory(prefix="ksm-guard-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        cmd = [
            QEMU, *_accel_args("kvm"), "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(images.kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/ksm-guard-probe",
            "-serial", f"file:{console}",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        text = console.read_text(errors="replace") if console.exists() else ""
        if "Linux version" in text and "Kernel panic" in text:
            accel = "kvm"
        log(f"KVM probe: {accel} ({time.monotonic() - start:.1f}s)")
    memo.write_text(json.dumps({"accel": accel, "host": host}))
    return accel


# ----- processes, ports, monitor -----

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """Return a 127.0.0.1 TCP port that nothing listens on (not handed out before)."""
    with _port_lock:
        for _ in range(100):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise VmError("no free local port found")


def _cmdline(pid: int) -> str:
    """Return the NUL-separated command line of ``pid`` joined by spaces ('' if gone/zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pid_alive(pid: int, marker: str) -> bool:
    """Tell whether ``pid`` runs and its command line contains ``marker`` (zombies are dead)."""
    return marker in _cmdline(pid)


def terminate(pid: int, marker: str, timeout: float = 15.0) -> None:
    """Stop ``pid`` (only if it is ours: ``marker`` in its cmdline): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if not pid_alive(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid, marker):
            time.sleep(0.05)
    if pid_alive(pid, marker):
        raise VmError(f"qemu pid {pid} survived SIGKILL")


def hmp(monitor: Path, command: str, timeout: float = 300.0) -> str:
    """Send one HMP command over the monitor's unix socket and return its output."""
    prompt = b"(qemu) "
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(monitor))
        buffer = b""
        while not buffer.endswith(prompt):
            chunk = sock.recv(4096)
            if not chunk:
                raise VmError(f"monitor {monitor} closed before its prompt")
            buffer += chunk
        sock.sendall(command.encode() + b"\n")
        buffer = b""
        while not buffer.endswith(prompt):
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                raise VmError(f"HMP {command!r} timed out after {timeout:.0f}s") from None
            if not chunk:  # e.g. after "quit"
                break
            buffer += chunk
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", buffer.decode(errors="replace"))
    return text.replace("\r", "").removesuffix("(qemu) ").strip()


def _process_start(pid: int) -> str:
    """Return the start time of ``pid`` from /proc (``''`` if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


# ----- guests -----


class Guest:
    """One running QEMU guest reachable over SSH on a forwarded 127.0.0.1 port."""

    def __init__(
        self,
        session: VmSession,
        name: str,
        flavour: str,
        vmdir: Path,
        disk: Path,
        memory_mib: int,
        vcpus: int,
    ) -> None:
        self.session = session
        self.name = name
        self.flavour = flavour
        self.vmdir = vmdir
        self.disk = disk
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.port = free_port()
        self.pid = 0
        self.key = session.key
        self.pidfile = vmdir / "qemu.pid"
        self.monitor = vmdir / "monitor.sock"
        self.console = vmdir / "console.log"
        self._users_connected: set[str] = set()
        self._workload_pids: list[int] = []

    def __repr__(self) -> str:
        return f"<Guest {self.name} ({self.flavour}) 127.0.0.1:{self.port} pid={self.pid}>"

    # --- life cycle ---

    def _qemu_command(self, loadvm: bool) -> list[str]:
        """Return the full QEMU command line for this guest."""
        images = self.session.images(self.flavour)
        cmd = [
            QEMU,
            *self.session.machine_args(self.memory_mib, self.vcpus),
            "-kernel", str(images.kernel),
            "-initrd", str(images.initrd),
            "-drive", f"id=d0,file={self.disk},if=none,format=qcow2,cache=unsafe",
            "-device", "virtio-blk-pci,drive=d0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.console}",
            "-monitor", f"unix:{self.monitor},server,nowait",
            "-pidfile", str(self.pidfile),
            "-daemonize",
        ]  # fmt: skip
        if loadvm:
            cmd += ["-loadvm", SNAPSHOT_TAG]
        return cmd

    def _launch(self, loadvm: bool) -> None:
        """Start QEMU daemonized; retry with another port if the forward cannot bind."""
        for attempt in range(3):
            self.pidfile.unlink(missing_ok=True)
            qemu_log = self.vmdir / "qemu.log"
            with open(qemu_log, "w") as out:
                proc = subprocess.run(
                    self._qemu_command(loadvm),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=120,
                )
            if proc.returncode == 0 and self.pidfile.exists():
                self.pid = int(self.pidfile.read_text().strip())
                return
            error = qemu_log.read_text(errors="replace")
            if "hostfwd" in error or "host forwarding" in error:
                log(f"{self.name}: port {self.port} taken (attempt {attempt + 1}), retrying")
                self.port = free_port()
                continue
            raise VmError(f"{self.name}: qemu failed to start:\n{_tail(error)}")
        raise VmError(f"{self.name}: could not bind a forwarded SSH port")

    def is_running(self) -> bool:
        """Tell whether this guest's QEMU process is alive."""
        return self.pid > 0 and pid_alive(self.pid, str(self.pidfile))

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """Return the last lines of the serial console log."""
        if not self.console.exists():
            return "(no console output)"
        return _tail(self.console.read_text(errors="replace"), lines)

    def _fail(self, why: str) -> VmError:
        """Build an error carrying the serial console's tail."""
        return VmError(
            f"{self.name} ({self.flavour}, port {self.port}): {why}\n"
            f"--- last {CONSOLE_TAIL_LINES} lines of {self.console} ---\n{self.console_tail()}"
        )

    def _await(self, condition: str, timeout: float, on_timeout: str, failure: str) -> str:
        """Poll a shell ``condition`` in the guest; return its stdout, or raise ``failure``."""
        result = self.ssh(
            _bounded_poll(condition, timeout, on_timeout), check=False, timeout=timeout + 30
        )
        if result.returncode != 0:
            raise self._fail(f"{failure}:\n{result.stderr}")
        return result.stdout

    def _wait_for_banner(self, deadline: float) -> None:
        """Poll the forwarded port until sshd sends its ``SSH-`` banner."""
        while time.monotonic() < deadline:
            if not self.is_running():
                raise self._fail("qemu exited while waiting for SSH")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn,
            ):
                conn.settimeout(1)
                if conn.recv(16).startswith(b"SSH-"):
                    return
            time.sleep(0.2)
        raise self._fail("timed out waiting for the SSH banner")

    def _wait_ready(self, timeout: float) -> None:
        """Wait for the banner, then for one real key login as root."""
        deadline = time.monotonic() + timeout
        self._wait_for_banner(deadline)
        while True:
            remaining = deadline - time.monotonic()
            proc = self.ssh("true", check=False, timeout=max(5.0, min(remaining, 30.0)))
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline or not self.is_running():
                raise self._fail(f"SSH login failed: {proc.stderr.strip()}")
            time.sleep(0.5)

    def restore(self, snapshot: Path, timeout: float = RESTORE_TIMEOUT_S) -> None:
        """Start from a copy of the booted snapshot and reset the guest clock."""
        start = time.monotonic()
        shutil.copyfile(snapshot, self.disk)
        self._launch(loadvm=True)
        self._wait_ready(timeout)
        self.ssh(f"date -s @{time.time():.3f} >/dev/null")
        log(f"{self.name}: restored from snapshot in {time.monotonic() - start:.1f}s")

    def cold_boot(self, timeout: float = COLD_BOOT_TIMEOUT_S) -> None:
        """Boot the current disk from scratch (no snapshot) and wait for SSH."""
        if self.is_running():
            raise VmError(f"{self.name} is already running")
        with COLD_BOOT_SLOTS:
            start = time.monotonic()
            self._launch(loadvm=False)
            self._wait_ready(timeout)
        log(f"{self.name}: cold boot to SSH in {time.monotonic() - start:.1f}s")

    def wait_stopped(self, timeout: float = 60.0) -> None:
        """Wait for QEMU to exit on its own (after a poweroff in the guest)."""
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise self._fail(f"qemu still running {timeout:.0f}s after poweroff")
            time.sleep(0.1)

    def reboot(self, timeout: float = COLD_BOOT_TIMEOUT_S) -> str:
        """Power off (QEMU exits: -no-reboot), cold-boot the same disk; return the new boot_id."""
        before = self.boot_id()
        self.ssh("systemctl poweroff --no-block", check=False, timeout=30)
        self.close_connections()
        self.wait_stopped()
        self.cold_boot(timeout)
        after = self.boot_id()
        if after == before:
            raise self._fail(f"boot_id unchanged after reboot ({after})")
        return after

    def stop(self) -> None:
        """Stop QEMU by its pidfile PID and close SSH master connections."""
        self.close_connections()
        if self.pid == 0 and self.pidfile.exists():
            self.pid = int(self.pidfile.read_text().strip() or 0)
        if self.pid:
            terminate(self.pid, str(self.pidfile))

    # --- access ---

    def _ssh_command(self, user: str) -> list[str]:
        """Return the OpenSSH client prefix for ``user`` on this guest."""
        config = str(self.session.ssh_config)
        return ["ssh", "-F", config, "-p", str(self.port), "-l", user, "127.0.0.1"]

    def ssh(
        self,
        cmd: str,
        user: str = "root",
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command in the guest as ``user`` through OpenSSH (multiplexed)."""
        args = [*self._ssh_command(user), cmd]
        self._users_connected.add(user)
        try:
            proc = subprocess.run(
                args,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise VmError(f"{user}@{self.name}: {cmd!r} timed out after {timeout}s") from None
        if check and proc.returncode != 0:
            raise GuestCommandError(self.name, user, proc)
        return proc

    def close_connections(self) -> None:
        """Close the OpenSSH master connections opened to this guest."""
        for user in sorted(self._users_connected):
            subprocess.run(
                [*self._ssh_command(user)[:-1], "-O", "exit", "127.0.0.1"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
                check=False,
            )
        self._users_connected.clear()

    def testinfra_host(self, user: str = "root", backend: str = "paramiko") -> Any:
        """Return a ``testinfra`` host for ``user`` (``paramiko`` or ``ssh`` backend)."""
        import testinfra

        return testinfra.get_host(
            f"{backend}://{user}@127.0.0.1:{self.port}",
            ssh_config=str(self.session.ssh_config),
            ssh_identity_file=str(self.key),
        )

    def pyinfra_host(
        self, user: str = "root", sudo: bool = False, name: str | None = None
    ) -> HostEntry:
        """Return a pyinfra inventory entry ``(name, data)`` for ``user`` on this guest."""
        data: dict[str, Any] = {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": self.port,
            "ssh_user": user,
            "ssh_key": str(self.key),
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "no",
        }
        if sudo:
            data["_sudo"] = True
        default = self.name if user == "root" else f"{self.name}-{user}"
        return (name or default, data)

    def boot_id(self) -> str:
        """Return the guest kernel's boot_id."""
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def read_ksm(self, name: str) -> str:
        """Return the content of /sys/kernel/mm/ksm/<name>."""
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"not a KSM sysfs file name: {name!r}")
        return self.ssh(f"cat {KSM_SYSFS}/{name}").stdout.strip()

    # --- KSM workload ---

    def start_workload(self, mib: int = 64, timeout: float = 60.0) -> int:
        """Start a mergeable workload of ``mib`` MiB, run KSM fast, wait until it merged."""
        shared, sharing = f"{KSM_SYSFS}/pages_shared", f"{KSM_SYSFS}/pages_sharing"
        page_size, before = self.ssh(
            f"getconf PAGESIZE; echo $(($(cat {shared}) + $(cat {sharing})))"
        ).stdout.split()
        self.ssh(f"cat > {GUEST_WORKLOAD_PATH}", input=WORKLOAD_SCRIPT.read_text())
        tag = f"/run/ksm-guard-workload-{len(self._workload_pids)}"
        self.ssh(
            f"rm -f {tag}.pid; nohup setsid python3 {GUEST_WORKLOAD_PATH} {mib} {tag}.pid"
            f" >{tag}.log 2>&1 </dev/null &"
        )
        ready = self._await(
            f"grep -qx ready {tag}.log && cat {tag}.pid",
            timeout,
            f"cat {tag}.log",
            f"workload did not become ready in {timeout:.0f}s",
        )
        pid = int(ready.strip())
        self._workload_pids.append(pid)
        self.ssh(
            f"echo 10000 > {KSM_SYSFS}/pages_to_scan; echo 10 > {KSM_SYSFS}/sleep_millisecs;"
            f" echo 1 > {KSM_SYSFS}/run"
        )
        # max_page_sharing (256) caps sharers per KSM page: count shared + sharing, not sharing.
        # ksmtuned (debian flavour) may write run=0 meanwhile: put it back while we wait.
        pages = mib * 1024 * 1024 // int(page_size)
        target = int(before) + int(pages * 0.9)
        self._await(
            f'[ "$(cat {KSM_SYSFS}/run)" = 1 ] || echo 1 > {KSM_SYSFS}/run;'
            f" [ $(($(cat {shared}) + $(cat {sharing}))) -ge {target} ]"
            f' && [ "$(cat {sharing})" -gt 0 ]',
            timeout,
            f"grep -H . {KSM_SYSFS}/*",
            f"{mib} MiB workload ({pages} pages) not merged within {timeout:.0f}s",
        )
        return pid

    def stop_workload(self, timeout: float = 30.0) -> None:
        """Kill the workloads started on this guest and wait until they are gone."""
        for pid in self._workload_pids:
            self.ssh(f"kill {pid} 2>/dev/null || true")
            self._await(
                f"! test -e /proc/{pid}",
                timeout,
                f"ps -o pid,stat,cmd -p {pid}",
                f"workload pid {pid} still alive",
            )
        self._workload_pids.clear()


def _bounded_poll(condition: str, timeout: float, on_timeout: str) -> str:
    """Return a guest shell loop polling ``condition`` every 0.1 s for ``timeout`` seconds."""
    return (
        f"end=$(($(date +%s) + {max(1, round(timeout))})); "
        f"while [ $(date +%s) -lt $end ]; do if {condition}; then exit 0; fi; sleep 0.1; done; "
        f"echo 'timed out after {timeout:.0f}s' >&2; {{ {on_timeout}; }} >&2; exit 1"
    )


# ----- sessions -----


class VmSession:
    """Owns a temp work dir and every guest started from it; stops them all on exit."""

    def __init__(
        self,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        vcpus: int = DEFAULT_VCPUS,
        keep: bool = False,
    ) -> None:
        reap_stale_sessions()
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.keep = keep
        self.key = ensure_key()
        self.workdir = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX))
        (self.workdir / "owner").write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
        if keep:
            (self.workdir / "keep").touch()
        (self.workdir / "ssh").mkdir()
        self.ssh_config = self.workdir / "ssh_config"
        self.guests: dict[str, Guest] = {}
        self._images: dict[str, ImagePaths] = {}
        self._accel = ""
        self._lock = threading.Lock()
        self._closed = False
        self._counter = 0
        self._previous_handlers: dict[int, Any] = {}
        self._write_ssh_config()
        atexit.register(self.close)
        self._install_signal_handlers()

    def __enter__(self) -> VmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_signal_handlers(self) -> None:
        """Turn SIGTERM/SIGHUP into SystemExit so that cleanup runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._previous_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def images(self, flavour: str) -> ImagePaths:
        """Return (building once) the image paths for ``flavour``."""
        with self._lock:
            if flavour not in self._images:
                self._images[flavour] = ensure_image(flavour)
            return self._images[flavour]

    @property
    def accel(self) -> str:
        """Return the accelerator in use (probed once)."""
        if not self._accel:
            self._accel = detect_accel(self.images(FLAVOURS[0]))
            log(f"accelerator: {self._accel}")
        return self._accel

    def machine_args(self, memory_mib: int, vcpus: int) -> list[str]:
        """Return the QEMU arguments that define the machine (the snapshot must match them)."""
        return [
            # mem-merge=off: keep the host's own KSM away from guest RAM (realksm tests)
            "-M", "q35,sata=off,smbus=off,vmport=off,mem-merge=off",
            *_accel_args(self.accel),
            "-m", str(memory_mib),
            "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet mitigations=off"
            " cryptomgr.notests 8250.nr_uarts=1 tsc=reliable no_timer_check",
        ]  # fmt: skip

    def snapshot_path(self, flavour: str, memory_mib: int, vcpus: int) -> Path:
        """Return where the booted snapshot for these machine settings is cached."""
        images = self.images(flavour)
        procedure = inspect.getsource(VmSession._make_snapshot)
        key = json.dumps(
            [images.root.name, flavour, self.machine_args(memory_mib, vcpus), procedure]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return images.snapshots / f"{flavour}-{memory_mib}m-{vcpus}c-{digest}.qcow2"

    def _new_guest(
        self, flavour: str, name: str, memory_mib: int, vcpus: int, disk: Path | None = None
    ) -> Guest:
        """Create (not start) a guest with its own run dir."""
        with self._lock:
            if name in self.guests:
                raise ValueError(f"a guest named {name!r} already runs in this session")
            vmdir = self.workdir / name
            vmdir.mkdir()
            guest = Guest(
                self, name, flavour, vmdir, disk or vmdir / "disk.qcow2", memory_mib, vcpus
            )
            self.guests[name] = guest
        return guest

    def _make_snapshot(self, flavour: str, memory_mib: int, vcpus: int) -> None:
        """Cold-boot a guest, let it settle, ``savevm`` it, publish the qcow2 atomically."""
        images = self.images(flavour)
        final = self.snapshot_path(flavour, memory_mib, vcpus)
        tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=images.snapshots))
        name = f"snapshot-{flavour}-{memory_mib}m"
        guest = self._new_guest(flavour, name, memory_mib, vcpus, disk=tmpdir / final.name)
        try:
            with timed(f"{flavour}: cold boot + savevm for {final.name}"):
                overlay: list[str | Path] = ["-q", "-f", "qcow2", "-F", "raw", "-b", images.disk]
                _run(["qemu-img", "create", *overlay, guest.disk])
                guest.cold_boot()
                settle = "timeout 90 systemctl is-system-running --wait >/dev/null"
                guest.ssh(f"{settle}; true")
                if flavour == "debian":
                    # Save a just-started pair: every restored guest then reads run=1 (written by
                    # ksm.service) until ksmtuned's first adjustment, KSMTUNED_FIRST_ADJUST_S
                    # after the restore, writes run=0 (an idle guest has plenty of free memory).
                    guest.ssh("systemctl restart ksm.service ksmtuned.service")
                if flavour == "pve":  # save it with KSM on, as ksmtuned leaves a Proxmox node
                    guest.ssh(_bounded_poll(f'[ "$(cat {KSM_SYSFS}/run)" = 1 ]', 60, "true"))
                guest.ssh("sync")
                guest.close_connections()
                out = hmp(guest.monitor, f"savevm {SNAPSHOT_TAG}")
                if "rror" in out:
                    raise guest._fail(f"savevm failed: {out}")
                hmp(guest.monitor, "quit", timeout=30)
                guest.wait_stopped(30)
            listing = _run(["qemu-img", "snapshot", "-l", guest.disk])
            if SNAPSHOT_TAG not in listing:
                raise VmError(f"snapshot {SNAPSHOT_TAG!r} missing from {guest.disk}:\n{listing}")
            guest.disk.rename(final)
            for outdated in final.parent.glob(f"{final.name.rsplit('-', 1)[0]}-*.qcow2"):
                if outdated != final:  # same machine settings, older procedure or command line
                    outdated.unlink()
        finally:
            self.stop(guest)
            shutil.rmtree(tmpdir, ignore_errors=True)

    def ensure_snapshots(self, flavours: Iterable[str], memory_mib: int, vcpus: int) -> None:
        """Create the missing booted snapshots (in parallel, under the cache lock)."""
        wanted = sorted(set(flavours))
        for flavour in wanted:
            self.images(flavour)
        _ = self.accel
        if all(self.snapshot_path(f, memory_mib, vcpus).exists() for f in wanted):
            return
        with _locked(cache_root() / ".lock"):
            for stale in self.images(wanted[0]).snapshots.glob(".tmp-*"):  # from killed runs
                shutil.rmtree(stale, ignore_errors=True)
            missing = [f for f in wanted if not self.snapshot_path(f, memory_mib, vcpus).exists()]
            _parallel(lambda f: self._make_snapshot(f, memory_mib, vcpus), missing)

    def start(
        self,
        flavour: str,
        name: str | None = None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
    ) -> Guest:
        """Start one pristine guest of ``flavour`` from its booted snapshot."""
        return next(
            iter(self.start_many([flavour], [name] if name else None, memory_mib, vcpus).values())
        )

    def start_many(
        self,
        flavours: Sequence[str],
        names: Sequence[str] | None = None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
    ) -> dict[str, Guest]:
        """Start pristine guests in parallel; return them by name (default: the flavour)."""
        memory = memory_mib or self.memory_mib
        cpus = vcpus or self.vcpus
        for flavour in flavours:
            if flavour not in FLAVOURS:
                raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
        self.ensure_snapshots(flavours, memory, cpus)
        guests = [
            self._new_guest(flavour, name, memory, cpus)
            for flavour, name in zip(flavours, names or self._default_names(flavours), strict=True)
        ]
        try:
            _parallel(lambda g: g.restore(self.snapshot_path(g.flavour, memory, cpus)), guests)
        except BaseException:
            for guest in guests:
                self.stop(guest)
            raise
        self._write_ssh_config()
        return {guest.name: guest for guest in guests}

    def _default_names(self, flavours: Sequence[str]) -> list[str]:
        """Name guests after their flavour, adding a counter when that name is taken."""
        names: list[str] = []
        for flavour in flavours:
            name = flavour
            while name in self.guests or name in names:
                self._counter += 1
                name = f"{flavour}-{self._counter}"
            names.append(name)
        return names

    def stop(self, guest: Guest) -> None:
        """Stop one guest and delete its run dir."""
        try:
            guest.stop()
        finally:
            with self._lock:
                self.guests.pop(guest.name, None)
            shutil.rmtree(guest.vmdir, ignore_errors=True)
            self._write_ssh_config()

    def close(self) -> None:
        """Stop every guest of this session (unless kept) and remove the work dir."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)
        if self.keep:
            log(f"keeping {len(self.guests)} VM(s); ssh config: {self.ssh_config}")
            for guest in self.guests.values():
                log(f"  ssh -F {self.ssh_config} {guest.name}   # pid {guest.pid}")
            log(f"stop them with: python -m tests.vm.harness reap --all  (work dir {self.workdir})")
            return
        errors = []
        for guest in list(self.guests.values()):
            try:
                self.stop(guest)
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise VmError(f"failed to stop {len(errors)} guest(s): {errors}")

    def _write_ssh_config(self) -> None:
        """(Re)write the session's ssh_config: one alias per guest plus common options."""
        lines = ["# Written by ksm-guard's VM test harness."]
        for guest in self.guests.values():
            lines += [
                f"Host {guest.name}",
                "    HostName 127.0.0.1",
                f"    Port {guest.port}",
                "    User root",
            ]
        lines += [
            "Host *",
            f"    IdentityFile {self.key}",
            "    IdentitiesOnly yes",
            "    StrictHostKeyChecking no",
            "    UserKnownHostsFile /dev/null",
            "    GlobalKnownHostsFile /dev/null",
            "    LogLevel ERROR",
            "    KexAlgorithms curve25519-sha256",
            "    BatchMode yes",
            "    ConnectTimeout 10",
            "    ServerAliveInterval 5",
            "    ServerAliveCountMax 3",
            "    ControlMaster auto",
            f"    ControlPath {self.workdir}/ssh/%C",
            "    ControlPersist 120",
        ]
        tmp = self.ssh_config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(self.ssh_config)


def _exit_on_signal(signum: int, _frame: object) -> None:
    """Raise SystemExit so that context managers and atexit handlers stop the VMs."""
    raise SystemExit(128 + signum)


def _parallel(func: Callable[[Any], None], items: Sequence[Any]) -> None:
    """Run ``func`` over ``items`` in threads; re-raise the first failure after all finish."""
    if len(items) <= 1:
        for item in items:
            func(item)
        return
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(func, item) for item in items]
    for future in futures:
        future.result()


def reap_stale_sessions(include_kept: bool = False) -> int:
    """Stop VMs left by sessions whose owner process is gone; return how many were stopped."""
    stopped = 0
    for workdir in Path(tempfile.gettempdir()).glob(f"{SESSION_PREFIX}*"):
        try:
            pid_text, start = (workdir / "owner").read_text().split()
        except (OSError, ValueError):
            continue
        if _process_start(int(pid_text)) == start:
            continue  # owner still alive
        if (workdir / "keep").exists() and not include_kept:
            continue
        for pidfile in workdir.glob("*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError, VmError):
                pid = int(pidfile.read_text().strip())
                if pid_alive(pid, str(pidfile)):
                    terminate(pid, str(pidfile))
                    stopped += 1
        shutil.rmtree(workdir, ignore_errors=True)
    if stopped:
        log(f"stopped {stopped} VM(s) left over by earlier sessions")
    return stopped


# ----- inventories -----


def unreachable_host(name: str = "dead", key: Path | None = None) -> HostEntry:
    """Return an inventory entry pointing at a local port where nothing listens."""
    return (
        name,
        {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": free_port(),
            "ssh_user": "root",
            "ssh_key": str(key or ensure_key()),
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "no",
        },
    )


def write_inventory(
    path: Path,
    entries: Iterable[Guest | HostEntry],
    extra_hosts: Iterable[HostEntry] = (),
    group: str = "guests",
) -> Path:
    """Write a pyinfra inventory module with one list ``group`` of (name, data) tuples."""
    hosts = [e.pyinfra_host() if isinstance(e, Guest) else e for e in entries]
    hosts += list(extra_hosts)
    names = [name for name, _ in hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate host names in inventory: {names}")
    if not group.isidentifier():
        raise ValueError(f"not a Python identifier: {group!r}")
    lines = [f"    ({name!r}, {dict(sorted(data.items()))!r})," for name, data in hosts]
    path = Path(path)
    path.write_text(
        '"""pyinfra inventory written by ksm-guard\'s VM test harness."""\n\n'
        f"{group} = [\n" + "\n".join(lines) + "\n]\n"
    )
    return path


# ----- command line -----


def _cmd_build(args: argparse.Namespace) -> int:
    """Build or reuse the images (and optionally the snapshots), print where they are."""
    timings: dict[str, float] = {}
    with timed("ensure images", timings):
        images = ensure_image(FLAVOURS[0])
    print(f"cache: {images.root}")
    if args.snapshots:
        with VmSession(memory_mib=args.memory) as session, timed("ensure snapshots", timings):
            session.ensure_snapshots(FLAVOURS, args.memory, DEFAULT_VCPUS)
            print(f"accel: {session.accel}")
    print(json.dumps(timings))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    """Boot guests, print how to reach them, wait for Ctrl-C, then stop them."""
    flavours = args.flavour or list(FLAVOURS)
    with VmSession(memory_mib=args.memory) as session:
        with timed(f"boot {', '.join(flavours)}"):
            guests = session.start_many(flavours)
        inventory = write_inventory(session.workdir / "inventory.py", guests.values())
        for guest in guests.values():
            print(f"{guest.name:10} ssh -F {session.ssh_config} {guest.name}")
        print(f"pyinfra inventory: {inventory}\nCtrl-C stops the VMs.", flush=True)
        try:
            while any(guest.is_running() for guest in guests.values()):
                time.sleep(1)
            print("all VMs exited")
        except KeyboardInterrupt:
            print("stopping")
    return 0


def _cmd_reap(args: argparse.Namespace) -> int:
    """Stop VMs of dead sessions (with --all also those kept with --keep-vms)."""
    print(f"stopped {reap_stale_sessions(include_kept=args.all)} VM(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tests.vm.harness``."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.vm.harness", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or reuse the cached images")
    build.add_argument("--snapshots", action="store_true", help="also create the booted snapshots")
    build.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, help="guest MiB")
    build.set_defaults(func=_cmd_build)
    up = sub.add_parser("up", help="boot guests until Ctrl-C")
    up.add_argument("--flavour", action="append", choices=FLAVOURS, help="repeatable")
    up.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, help="guest MiB")
    up.set_defaults(func=_cmd_up)
    reap = sub.add_parser("reap", help="stop VMs left over by dead sessions")
    reap.add_argument("--all", action="store_true", help="include sessions kept with --keep-vms")
    reap.set_defaults(func=_cmd_reap)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
