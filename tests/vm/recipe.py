"""The image recipe: what goes into the Debian test images of each release and flavour, and how."""

# The cache key (``recipe_key``) covers RECIPE_VERSION and ``recipe_data(release)``: the release
# and the constants below, not the source text. Changing a constant rebuilds the images on its
# own; changing what a build function does (a new step, another order, a different command) needs
# RECIPE_VERSION bumped. Reformatting, comments and unrelated code rebuild nothing. Each release
# has its own key: a step only one release takes (trixie's zstd kernel) changes only its images.

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.vm.util import VmError, run, timed

RECIPE_VERSION = 2  # 2: no initramfs while debootstrap installs the kernel (INITRD=No)

# Debian releases, oldest first: bookworm = Debian 12 (Proxmox VE 8's base, kernel 6.1, systemd
# 252), trixie = Debian 13 (Proxmox VE 9's base, kernel 6.12, systemd 257). Each is built from
# Debian's own packages with the same recipe; the primary one is the target most users run.
RELEASES = ("bookworm", "trixie")
PRIMARY_RELEASE = "trixie"
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
    "prometheus-node-exporter",  # the drift watch's metrics (tests/integration/test_watch.py)
)
USERS = ("root", "admin", "nosudo")  # all accept the suite's key; admin has passwordless sudo
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
# Files written into the base tree: path -> (content, mode).
BASE_FILES: dict[str, tuple[str, int]] = {
    "etc/hostname": ("ksm-guard-test\n", 0o644),
    "etc/hosts": ("127.0.0.1 localhost\n127.0.1.1 ksm-guard-test\n", 0o644),
    "etc/fstab": ("/dev/vda / ext4 rw,relatime 0 0\n", 0o644),
    "etc/resolv.conf": ("nameserver 10.0.2.3\n", 0o644),
    # QEMU's user network is fixed: a static address skips the DHCP round trip.
    "etc/systemd/network/80-ksm-guard-dhcp.network": (
        "[Match]\nName=en* eth*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n"
        "DNS=10.0.2.3\n",
        0o644,
    ),
    "etc/ssh/sshd_config.d/ksm-guard.conf": (
        "UseDNS no\nPermitRootLogin prohibit-password\n",
        0o644,
    ),
    "etc/sudoers.d/ksm-guard-admin": ("admin ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440),
    "etc/modprobe.d/ksm-guard-blacklist.conf": (
        "".join(f"blacklist {name}\n" for name in BLACKLISTED_MODULES),
        0o644,
    ),
}
# Files only one release's base tree gets. OpenSSH 9.8+ (trixie's 10.0) penalises a source
# address that connects and leaves without authenticating (PerSourcePenalties, "noauth"), then
# refuses its new connections for a while: the harness's banner waits while a guest boots are
# such connections, and everything from this machine reaches the guest from QEMU's user-network
# gateway, 10.0.2.2. Without the exemption sshd dropped ksm-guard's first connection after a
# reboot ("Error reading SSH protocol banner") in three of four runs; bookworm's 9.2 has neither
# the penalties nor the option.
RELEASE_FILES: dict[str, dict[str, tuple[str, int]]] = {
    "trixie": {
        "etc/ssh/sshd_config.d/ksm-guard-penalties.conf": (
            "PerSourcePenaltyExemptList 10.0.2.2\n",
            0o644,
        ),
    },
}
# pam_motd runs scripts at every login: slow under TCG. Lines matching this are commented out.
PAM_SSHD_DISABLED = r"(?m)^session\s+optional\s+pam_motd\.so.*$"
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
PVE_PACKAGE_FILE = "ksm-control-daemon_1.5-1_all.deb"
WANTS = "etc/systemd/system/multi-user.target.wants"


@dataclasses.dataclass(frozen=True)
class Flavour:
    """How one image differs from the base tree, and the KSM units it must end up with."""

    purge: tuple[str, ...]  # packages removed from the base tree
    pve_package: bool  # install the ksm-control-daemon stand-in (with PVE_KSMTUNED_TUNING)
    units: tuple[tuple[str, bool], ...]  # (unit, present) in /usr/lib/systemd and enabled


FLAVOUR_RECIPES = {
    "debian": Flavour((), False, (("ksm.service", True), ("ksmtuned.service", True))),
    "pve": Flavour(("ksmtuned",), True, (("ksm.service", False), ("ksmtuned.service", True))),
    "bare": Flavour(("ksmtuned",), False, (("ksm.service", False), ("ksmtuned.service", False))),
}
FLAVOURS = tuple(FLAVOUR_RECIPES)


def check_release(release: str) -> str:
    """Return ``release`` if the recipe knows it, else raise ValueError."""
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; expected one of {RELEASES}")
    return release


def recipe_data(release: str) -> dict[str, Any]:
    """Return everything the images of ``release`` are built from, as plain JSON-able data."""
    return {
        "version": RECIPE_VERSION,
        "suite": check_release(release),
        "packages": PACKAGES,
        "users": USERS,
        "image_size": IMAGE_SIZE,
        "initrd_modules": INITRD_MODULES,
        "pruned_module_trees": PRUNED_MODULE_TREES,
        "masked_units": MASKED_UNITS,
        "base_files": BASE_FILES,
        # only where there are some: a release without leaves its key as it was
        **({"release_files": RELEASE_FILES[release]} if release in RELEASE_FILES else {}),
        "pam_sshd_disabled": PAM_SSHD_DISABLED,
        "chroot_env": CHROOT_ENV,
        "pve_unit": PVE_KSMTUNED_UNIT,
        "pve_tuning": PVE_KSMTUNED_TUNING,
        "pve_control": PVE_PACKAGE_CONTROL,
        "pve_scripts": PVE_PACKAGE_SCRIPTS,
        "flavours": {name: dataclasses.asdict(f) for name, f in FLAVOUR_RECIPES.items()},
    }


def recipe_key(release: str, pubkey: str, qemu_version: str) -> str:
    """Return the cache key of ``release``'s images: recipe version and data, public key, QEMU
    version."""
    document = {"recipe": recipe_data(release), "pubkey": pubkey, "qemu": qemu_version}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----- building -----


def _chroot(root: Path, *cmd: str) -> str:
    """Run a command inside the image tree."""
    return run(["chroot", root, *cmd], env=CHROOT_ENV)


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


def debian_mirror(release: str) -> str:
    """Return the Debian archive URL that apt uses on this machine (for ``release``, if listed)."""
    stanzas = list(_apt_source_stanzas())
    for uri, suites in stanzas:
        if release in suites:
            return uri
    for uri, suites in stanzas:
        if any(s.isalpha() for s in suites) and "security" not in uri:
            return uri  # a main archive of another release serves every release
    raise VmError("no Debian mirror found in /etc/apt/sources.list{,.d/*}")


def _unxz(payload: bytes) -> bytes:
    """Decompress one xz stream at the start of ``payload`` (b"" if it is none)."""
    try:
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    except lzma.LZMAError:
        return b""


def _unzstd(payload: bytes) -> bytes:
    """Decompress the zstd frame at the start of ``payload`` with the zstd tool (b"" if none).

    zstd exits non-zero over the bzImage's bytes after the frame; the frame's output is whole.
    """
    proc = subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True, check=False)
    return proc.stdout


# A bzImage's payload: bookworm's 6.1 kernel is xz-compressed, trixie's 6.12 zstd-compressed.
KERNEL_COMPRESSIONS = ((b"\xfd7zXZ\x00", _unxz), (b"\x28\xb5\x2f\xfd", _unzstd))


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside an xz- or zstd-compressed bzImage."""
    for magic, decompress in KERNEL_COMPRESSIONS:
        start = bzimage.find(magic)
        while start != -1:
            elf = decompress(bzimage[start:])
            if elf.startswith(b"\x7fELF"):
                return elf
            start = bzimage.find(magic, start + 1)
    raise VmError("no xz- or zstd-compressed ELF kernel found in the bzImage")


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


def _customise_base(root: Path, pubkey: str, release: str) -> None:
    """Network, SSH, users, boot-speed trims and a small initrd, common to all flavours."""
    for relative, (text, mode) in {**BASE_FILES, **RELEASE_FILES.get(release, {})}.items():
        _write(root / relative, text, mode)
    pam_sshd = root / "etc/pam.d/sshd"
    pam_sshd.write_text(re.sub(PAM_SSHD_DISABLED, r"# \g<0>", pam_sshd.read_text()))
    _chroot(root, "systemctl", "enable", "systemd-networkd.service")
    _chroot(root, "systemctl", "mask", *MASKED_UNITS)
    for user in USERS:
        _add_user(root, user, pubkey)
    version = _kernel_version(root)
    for tree in PRUNED_MODULE_TREES:
        shutil.rmtree(root / "lib/modules" / version / "kernel" / tree, ignore_errors=True)
    _chroot(root, "depmod", "-a", version)
    conf = root / "etc/initramfs-tools/initramfs.conf"
    conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text()))
    with open(root / "etc/initramfs-tools/modules", "a") as modules:
        modules.write("".join(f"{name}\n" for name in INITRD_MODULES))
    _chroot(root, "update-initramfs", "-c", "-k", version)
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
    deb = out / PVE_PACKAGE_FILE
    run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", pkg, deb])
    shutil.rmtree(pkg)
    return deb


def _customise_flavour(root: Path, name: str, pve_deb: Path) -> None:
    """Turn a copy of the base tree into flavour ``name`` and check its KSM unit layout."""
    flavour = FLAVOUR_RECIPES[name]
    for package in flavour.purge:
        _chroot(root, "dpkg", "--purge", package)
    if flavour.pve_package:
        shutil.copy(pve_deb, root / "tmp" / pve_deb.name)
        _chroot(root, "dpkg", "-i", f"/tmp/{pve_deb.name}")
        (root / "tmp" / pve_deb.name).unlink()
        with open(root / "etc/ksmtuned.conf", "a") as conf:
            conf.write(PVE_KSMTUNED_TUNING)
    for unit, present in flavour.units:
        for path in (root / "usr/lib/systemd/system" / unit, root / WANTS / unit):
            if os.path.lexists(path) != present:
                raise VmError(f"flavour {name}: {path} should {'' if present else 'not '}exist")


def build_images(
    dest: Path, release: str, pubkey: str, debs: Path, timings: dict[str, float]
) -> None:
    """Build ``release``'s kernel, initrd and one ext4 image per flavour into ``dest``."""
    base = dest / "rootfs"
    mirror = debian_mirror(check_release(release))
    with timed(f"{release}: debootstrap from {mirror}", timings):
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--cache-dir={debs}",
                release,
                base,
                mirror,
            ],
            # The kernel package's initramfs hook honours INITRD=No: the full initramfs it would
            # build (about 30 s of CPU per release) is replaced by the small one made below.
            env={**os.environ, "INITRD": "No"},
        )
    with timed(f"{release}: customise base tree", timings):
        _customise_base(base, pubkey, release)
        version = _kernel_version(base)
        (dest / "vmlinux").write_bytes(
            extract_vmlinux((base / f"boot/vmlinuz-{version}").read_bytes())
        )
        shutil.copy(base / f"boot/initrd.img-{version}", dest / "initrd.img")
        pve_deb = _build_pve_package(base, dest)
    for flavour in FLAVOURS:
        last = flavour == FLAVOURS[-1]
        tree = base if last else dest / f"tree-{flavour}"
        with timed(f"{release}: flavour {flavour}: copy, customise, mkfs.ext4", timings):
            if not last:
                run(["cp", "-a", base, tree])
            _customise_flavour(tree, flavour, pve_deb)
            image = dest / f"{flavour}.raw"
            run(["mkfs.ext4", "-q", "-F", "-L", "ksmguard", "-d", tree, image, IMAGE_SIZE])
            shutil.rmtree(tree)
    (dest / "snapshots").mkdir()
    (dest / "manifest.json").write_text(
        json.dumps(
            {
                "release": release,
                "kernel": version,
                "mirror": mirror,
                "flavours": FLAVOURS,
                "timings": timings,
            },
            indent=2,
        )
    )
