"""The image cache: the suite's SSH key, published builds keyed by release and recipe, locks."""

# Layout of the cache (``$KSM_GUARD_VM_CACHE``, default ``~/.cache/ksm-guard/vm``)::
#
#     id_ed25519[.pub]         the suite's SSH key, accepted by root, admin and nosudo
#     debs/<release>/          debootstrap's package cache, one per Debian release
#     .lock-<release>          held while a release's images or snapshots are made
#     <recipe key>/            one published build of one release (atomic rename of a temp dir)
#         vmlinux initrd.img   ELF kernel extracted from Debian's bzImage, small initrd
#         debian.raw pve.raw bare.raw   one ext4 image per flavour
#         snapshots/<flavour>-<MiB>m-<vCPUs>c-<key>.qcow2   booted guest saved by ``savevm``
#         manifest.json        release, kernel version, mirror, build timings
#
# The recipe key is ``recipe.recipe_key``: RECIPE_VERSION, the release and the recipe's data, the
# public key and ``qemu-system-x86_64 --version``. Snapshot keys are the session's
# (``session.snapshot_path``). Releases have their own locks, so that two builds can run at once.

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.vm.qemu import qemu_version
from tests.vm.recipe import FLAVOURS, RELEASES, build_images, check_release, recipe_key
from tests.vm.util import VmError, log, timed

LOCK_TIMEOUT_S = 1800.0
# Each recipe change leaves ~2.5 GB behind: keep the most recently used builds of each release
# (worktrees with other recipes share the cache).
KEPT_BUILDS = 3


def cache_root() -> Path:
    """Return the cache directory (created if missing)."""
    default = Path.home() / ".cache" / "ksm-guard" / "vm"
    root = Path(os.environ.get("KSM_GUARD_VM_CACHE") or default).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
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
    with locked(root / ".lock"):
        if not key.exists():
            tmp = root / f".id_ed25519.{os.getpid()}"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ksm-guard-tests", "-f", tmp],
                check=True,
            )
            tmp.with_suffix(tmp.suffix + ".pub").rename(key.with_suffix(".pub"))
            tmp.rename(key)
    return key


@dataclasses.dataclass(frozen=True)
class ImagePaths:
    """Where the cached artefacts of one published build live."""

    root: Path
    release: str

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"

    @property
    def snapshots(self) -> Path:
        """Directory of saved, booted guests."""
        return self.root / "snapshots"

    def disk(self, flavour: str) -> Path:
        """The pristine ext4 image of ``flavour``."""
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
        return self.root / f"{flavour}.raw"


def release_lock(release: str) -> Path:
    """Return the lock file of ``release``'s builds and snapshots."""
    return cache_root() / f".lock-{check_release(release)}"


def ensure_images(release: str) -> ImagePaths:
    """Build ``release``'s images of every flavour once, or reuse the cache; return where."""
    pubkey = ensure_key().with_suffix(".pub").read_text()
    cache = cache_root()
    root = cache / recipe_key(release, pubkey, qemu_version())
    if not (root / "manifest.json").exists():
        with locked(release_lock(release)):
            if not (root / "manifest.json").exists():
                _publish_build(cache, root, release, pubkey)
                _prune_old_builds(cache, root, release)
    (root / "last-used").touch()
    return ImagePaths(root, release)


def _publish_build(cache: Path, root: Path, release: str, pubkey: str) -> None:
    """Build into a temp dir under the cache, then rename it into place."""
    if os.geteuid() != 0:
        raise VmError("building the VM images needs root (debootstrap, chroot)")
    tools = ("debootstrap", "mkfs.ext4", "qemu-img", "zstd")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise VmError(
            f"{', '.join(missing)} not found: install debootstrap e2fsprogs qemu-utils zstd"
        )
    prefix = f".build-{release}-"
    for stale in cache.glob(f"{prefix}*"):  # we hold the release's lock: from killed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=cache))
    timings: dict[str, float] = {}
    try:
        with timed(f"build {release} images into {root}", timings):
            debs = cache / "debs" / release
            debs.mkdir(parents=True, exist_ok=True)
            build_images(tmp, release, pubkey, debs, timings)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_release(build: Path) -> str:
    """Return the release of a published build (builds from before releases were bookworm)."""
    manifest = json.loads((build / "manifest.json").read_text())
    return str(manifest.get("release", RELEASES[0]))


def _prune_old_builds(cache: Path, current: Path, release: str) -> None:
    """Delete ``release``'s builds beyond the ``KEPT_BUILDS`` most recently used ones."""

    def last_used(build: Path) -> float:
        marker = build / "last-used"
        return marker.stat().st_mtime if marker.exists() else 0.0

    builds = [
        p
        for p in cache.iterdir()
        if (p / "manifest.json").exists() and p != current and build_release(p) == release
    ]
    for old in sorted(builds, key=last_used, reverse=True)[KEPT_BUILDS - 1 :]:
        log(f"removing old build {old}")
        shutil.rmtree(old, ignore_errors=True)
