"""A session of guests: booted snapshots, starting and stopping guests, SSH config, cleanup."""

# Per session, guests run from copies of the snapshot overlay in a temp dir
# (``/tmp/ksm-guard-vms-*``); they are stopped by the PID in their pidfile (context manager,
# atexit, SIGTERM/SIGHUP), unless the session keeps them (``keep=True``, default from
# ``KSM_GUARD_KEEP_VMS=1``): then ``release`` (tests done with a guest, a failed start) and
# ``close`` leave every guest running; only the guests that make snapshots are always stopped.
# VMs of sessions whose owner died are reaped by the next session or ``python -m tests.vm reap``
# (``--all``: kept ones too).

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.vm.accel import accel_args, detect_accel
from tests.vm.cache import ImagePaths, ensure_images, ensure_key, locked, release_lock
from tests.vm.guest import (
    DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
    KSM_SYSFS,
    Guest,
    bounded_poll,
)
from tests.vm.qemu import SNAPSHOT_TAG, hmp, pid_alive, process_start, terminate
from tests.vm.recipe import FLAVOURS, PRIMARY_RELEASE, check_release
from tests.vm.util import VmError, log, run, timed

SESSION_PREFIX = "ksm-guard-vms-"
KEEP_ENV = "KSM_GUARD_KEEP_VMS"

# The snapshot key covers SNAPSHOT_VERSION, the machine's command line and SNAPSHOT_STEPS: bump
# the version when ``_make_snapshot`` itself changes.
SNAPSHOT_VERSION = 1
_SETTLE = "timeout 90 systemctl is-system-running --wait >/dev/null; true"
# Run in the cold-booted guest before ``savevm``.
SNAPSHOT_STEPS: dict[str, tuple[str, ...]] = {
    # A just-started pair: a restored guest reads run=1 (written by ksm.service) until ksmtuned's
    # first adjustment, about 60 s after the restore, writes run=0 (an idle guest has plenty of
    # free memory).
    "debian": (_SETTLE, "systemctl restart ksm.service ksmtuned.service", "sync"),
    # KSM on, as ksmtuned leaves a busy Proxmox node.
    "pve": (_SETTLE, bounded_poll(f'[ "$(cat {KSM_SYSFS}/run)" = 1 ]', 60, "true"), "sync"),
    "bare": (_SETTLE, "sync"),
}


def keep_vms_from_env() -> bool:
    """Tell whether ``KSM_GUARD_KEEP_VMS=1`` asks to leave the VMs running."""
    return os.environ.get(KEEP_ENV) == "1"


class VmSession:
    """Owns a temp work dir and every guest started from it; stops them all on exit."""

    def __init__(
        self,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        vcpus: int = DEFAULT_VCPUS,
        keep: bool | None = None,
    ) -> None:
        reap_stale_sessions()
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.keep = keep_vms_from_env() if keep is None else keep
        self.key = ensure_key()
        self.workdir = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX))
        (self.workdir / "owner").write_text(f"{os.getpid()} {process_start(os.getpid())}\n")
        if self.keep:
            (self.workdir / "keep").touch()
        (self.workdir / "ssh").mkdir()
        self.ssh_config = self.workdir / "ssh_config"
        self.guests: dict[str, Guest] = {}
        self._images: dict[str, ImagePaths] = {}
        self._images_lock = threading.Lock()
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

    def images(self, release: str = PRIMARY_RELEASE) -> ImagePaths:
        """Return (building once) the cached images of ``release``."""
        check_release(release)
        if release not in self._images:
            images = ensure_images(release)  # outside our lock: releases build side by side
            with self._images_lock:
                self._images.setdefault(release, images)
        return self._images[release]

    @property
    def accel(self) -> str:
        """Return the accelerator in use (probed once, with the first release's kernel)."""
        if not self._accel:
            images = next(iter(self._images.values()), None) or self.images()
            self._accel = detect_accel(images.kernel, images.root)
            log(f"accelerator: {self._accel}")
        return self._accel

    def machine_args(self, memory_mib: int, vcpus: int) -> list[str]:
        """Return the QEMU arguments that define the machine (the snapshot must match them)."""
        return [
            # mem-merge=off: keep the host's own KSM away from guest RAM (realksm tests)
            "-M", "q35,sata=off,smbus=off,vmport=off,mem-merge=off",
            *accel_args(self.accel),
            "-m", str(memory_mib),
            "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet mitigations=off"
            " cryptomgr.notests 8250.nr_uarts=1 tsc=reliable no_timer_check",
        ]  # fmt: skip

    def snapshot_path(self, flavour: str, memory_mib: int, release: str = PRIMARY_RELEASE) -> Path:
        """Return where the booted snapshot of ``release`` for these machine settings is cached."""
        images = self.images(release)
        key = json.dumps(
            [
                SNAPSHOT_VERSION,
                images.root.name,
                flavour,
                self.machine_args(memory_mib, self.vcpus),
                SNAPSHOT_STEPS[flavour],
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return images.snapshots / f"{flavour}-{memory_mib}m-{self.vcpus}c-{digest}.qcow2"

    def _new_guest(
        self, flavour: str, name: str, memory_mib: int, release: str, disk: Path | None = None
    ) -> Guest:
        """Create (not start) a guest of ``release`` with its own run dir."""
        images, machine = self.images(release), self.machine_args(memory_mib, self.vcpus)
        with self._lock:
            if name in self.guests:
                raise ValueError(f"a guest named {name!r} already runs in this session")
            vmdir = self.workdir / name
            vmdir.mkdir()
            guest = Guest(
                name,
                flavour,
                release,
                vmdir,
                disk or vmdir / "disk.qcow2",
                kernel=images.kernel,
                initrd=images.initrd,
                machine=machine,
                ssh_config=self.ssh_config,
                key=self.key,
            )
            self.guests[name] = guest
        return guest

    def _make_snapshot(self, flavour: str, memory_mib: int, release: str) -> None:
        """Cold-boot a guest, run SNAPSHOT_STEPS, ``savevm`` it, publish the qcow2 atomically."""
        images = self.images(release)
        final = self.snapshot_path(flavour, memory_mib, release)
        tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=images.snapshots))
        name = f"snapshot-{release}-{flavour}-{memory_mib}m"
        guest = self._new_guest(flavour, name, memory_mib, release, disk=tmpdir / final.name)
        try:
            with timed(f"{release} {flavour}: cold boot + savevm for {final.name}"):
                base = images.disk(flavour)
                run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, guest.disk]
                )
                guest.cold_boot()
                for step in SNAPSHOT_STEPS[flavour]:
                    guest.ssh(step)
                guest.close_connections()
                out = hmp(guest.monitor, f"savevm {SNAPSHOT_TAG}")
                if "rror" in out:
                    raise guest.fail(f"savevm failed: {out}")
                hmp(guest.monitor, "quit", timeout=30)
                guest.wait_stopped(30)
            listing = run(["qemu-img", "snapshot", "-l", guest.disk])
            if SNAPSHOT_TAG not in listing:
                raise VmError(f"snapshot {SNAPSHOT_TAG!r} missing from {guest.disk}:\n{listing}")
            guest.disk.rename(final)
            for outdated in final.parent.glob(f"{final.name.rsplit('-', 1)[0]}-*.qcow2"):
                if outdated != final:  # same machine settings, older procedure or command line
                    outdated.unlink()
        finally:
            self.stop(guest)
            shutil.rmtree(tmpdir, ignore_errors=True)

    def ensure_snapshots(
        self, flavours: Iterable[str], memory_mib: int, release: str = PRIMARY_RELEASE
    ) -> None:
        """Create ``release``'s missing booted snapshots (in parallel, under its lock)."""
        wanted = sorted(set(flavours))
        if all(self.snapshot_path(f, memory_mib, release).exists() for f in wanted):
            return
        with locked(release_lock(release)):
            for stale in self.images(release).snapshots.glob(".tmp-*"):  # from killed runs
                shutil.rmtree(stale, ignore_errors=True)
            missing = [f for f in wanted if not self.snapshot_path(f, memory_mib, release).exists()]
            parallel(lambda f: self._make_snapshot(f, memory_mib, release), missing)

    def start(
        self,
        flavour: str,
        name: str | None = None,
        memory_mib: int | None = None,
        release: str = PRIMARY_RELEASE,
    ) -> Guest:
        """Start one pristine guest of ``flavour`` and ``release`` from its booted snapshot."""
        return self._start([flavour], [name] if name else None, memory_mib, release)[0]

    def start_many(
        self,
        flavours: Sequence[str],
        names: Sequence[str] | None = None,
        release: str = PRIMARY_RELEASE,
    ) -> dict[str, Guest]:
        """Start pristine guests of ``release`` in parallel; return them by name (default: their
        flavour)."""
        return {guest.name: guest for guest in self._start(flavours, names, None, release)}

    def _start(
        self,
        flavours: Sequence[str],
        names: Sequence[str] | None,
        memory_mib: int | None,
        release: str,
    ) -> list[Guest]:
        """Restore guests of ``flavours`` and ``release`` in parallel from their snapshots."""
        memory = memory_mib or self.memory_mib
        for flavour in flavours:
            if flavour not in FLAVOURS:
                raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
        self.ensure_snapshots(flavours, memory, release)
        guests = [
            self._new_guest(flavour, name, memory, release)
            for flavour, name in zip(flavours, names or self._default_names(flavours), strict=True)
        ]
        try:
            parallel(lambda g: g.restore(self.snapshot_path(g.flavour, memory, release)), guests)
        except BaseException:
            self.release(guests)  # kept with ``keep``: a failed restore is worth a look
            raise
        self._write_ssh_config()
        return guests

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

    def release(self, guests: Iterable[Guest]) -> None:
        """Stop guests a test is done with, unless the session keeps its VMs for debugging."""
        if self.keep:
            return
        for guest in list(guests):
            self.stop(guest)

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
            log(f"stop them with: python -m tests.vm reap --all  (work dir {self.workdir})")
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


def parallel(func: Callable[[Any], object], items: Sequence[Any]) -> None:
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
        if process_start(int(pid_text)) == start:
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
