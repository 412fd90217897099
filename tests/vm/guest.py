"""One QEMU guest: start (restore or cold boot), reach over SSH, reboot, stop, KSM workload."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.netutil import free_port, wait_for_ssh_banner
from tests.localssh import ssh_data
from tests.vm.qemu import QEMU, SNAPSHOT_TAG, pid_alive, terminate
from tests.vm.util import CONSOLE_TAIL_LINES, VmError, log, tail

KSM_SYSFS = "/sys/kernel/mm/ksm"
WORKLOAD_SCRIPT = Path(__file__).with_name("workload.py")
GUEST_WORKLOAD_PATH = "/var/tmp/ksm-guard-workload.py"
LIFETIME_S = 3600  # a forgotten workload frees its memory after an hour
COLD_BOOT_TIMEOUT_S = 420.0
RESTORE_TIMEOUT_S = 90.0
# A workload's memory held, or merged: ~10 s alone, several times that on a loaded 2-core host
# (the full tier under CI load took 151 s for the capacity test and its two workloads).
WORKLOAD_TIMEOUT_S = 240.0
# Six restores at once on a loaded 2-core TCG host once left a guest without an SSH banner for
# 90 s (the same snapshots restored at once in 22 s right after): a second attempt, logged.
RESTORE_ATTEMPTS = 2
DEFAULT_MEMORY_MIB = 1024
DEFAULT_VCPUS = 2
# TCG cold boots in parallel thrash 2 host cores (3 at once: 120 s each instead of 25 s).
COLD_BOOT_SLOTS = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) // DEFAULT_VCPUS))

HostEntry = tuple[str, dict[str, Any]]


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
            f"stdout: {tail(self.stdout or '', 20)}\nstderr: {tail(self.stderr or '', 20)}"
        )


def bounded_poll(condition: str, timeout: float, on_timeout: str) -> str:
    """Return a guest shell loop polling ``condition`` every 0.1 s for ``timeout`` seconds."""
    return (
        f"end=$(($(date +%s) + {max(1, round(timeout))})); "
        f"while [ $(date +%s) -lt $end ]; do if {condition}; then exit 0; fi; sleep 0.1; done; "
        f"echo 'timed out after {timeout:.0f}s' >&2; {{ {on_timeout}; }} >&2; exit 1"
    )


class Guest:
    """One QEMU guest reachable over SSH on a forwarded 127.0.0.1 port.

    ``machine`` is the QEMU command line that defines the machine (a snapshot restores only
    into the same one); ``disk`` a qcow2 overlay of the flavour's image.
    """

    def __init__(
        self,
        name: str,
        flavour: str,
        release: str,
        vmdir: Path,
        disk: Path,
        *,
        kernel: Path,
        initrd: Path,
        machine: list[str],
        ssh_config: Path,
        key: Path,
    ) -> None:
        self.name = name
        self.flavour = flavour
        self.release = release
        self.vmdir = vmdir
        self.disk = disk
        self.kernel = kernel
        self.initrd = initrd
        self.machine = machine
        self.ssh_config = ssh_config
        self.key = key
        self.port = free_port()
        self.metrics_port = free_port()  # the guest's node_exporter (:9100)
        self.pid = 0
        self.pidfile = vmdir / "qemu.pid"
        self.monitor = vmdir / "monitor.sock"
        self.console = vmdir / "console.log"
        self._users_connected: set[str] = set()
        self._workloads = 0

    def __repr__(self) -> str:
        return (
            f"<Guest {self.name} ({self.release} {self.flavour}) 127.0.0.1:{self.port}"
            f" pid={self.pid}>"
        )

    # --- life cycle ---

    def _qemu_command(self, loadvm: bool) -> list[str]:
        """Return the full QEMU command line for this guest."""
        cmd = [
            QEMU,
            *self.machine,
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-drive", f"id=d0,file={self.disk},if=none,format=qcow2,cache=unsafe",
            "-device", "virtio-blk-pci,drive=d0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22,"
                       f"hostfwd=tcp:127.0.0.1:{self.metrics_port}-:9100",
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
                self.port, self.metrics_port = free_port(), free_port()
                continue
            raise VmError(f"{self.name}: qemu failed to start:\n{tail(error)}")
        raise VmError(f"{self.name}: could not bind a forwarded SSH port")

    def is_running(self) -> bool:
        """Tell whether this guest's QEMU process is alive."""
        return self.pid > 0 and pid_alive(self.pid, str(self.pidfile))

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """Return the last lines of the serial console log."""
        if not self.console.exists():
            return "(no console output)"
        return tail(self.console.read_text(errors="replace"), lines)

    def fail(self, why: str) -> VmError:
        """Build an error carrying the serial console's tail."""
        return VmError(
            f"{self.name} ({self.release} {self.flavour}, port {self.port}): {why}\n"
            f"--- last {CONSOLE_TAIL_LINES} lines of {self.console} ---\n{self.console_tail()}"
        )

    def await_condition(self, condition: str, timeout: float, on_timeout: str, failure: str) -> str:
        """Poll a shell ``condition`` in the guest every 0.1 s for ``timeout`` seconds; return its
        stdout, or raise ``failure`` with the output of ``on_timeout``."""
        result = self.ssh(
            bounded_poll(condition, timeout, on_timeout), check=False, timeout=timeout + 30
        )
        if result.returncode != 0:
            raise self.fail(f"{failure}:\n{result.stderr}")
        return result.stdout

    def _check_running(self) -> None:
        """Raise when QEMU has exited (nothing left to wait for)."""
        if not self.is_running():
            raise self.fail("qemu exited while waiting for SSH")

    def _wait_ready(self, timeout: float) -> None:
        """Wait for sshd's banner, then for one real key login as root."""
        deadline = time.monotonic() + timeout
        try:
            wait_for_ssh_banner(self.port, timeout, check=self._check_running, interval=0.2)
        except TimeoutError:
            raise self.fail("timed out waiting for the SSH banner") from None
        while True:
            remaining = deadline - time.monotonic()
            proc = self.ssh("true", check=False, timeout=max(5.0, min(remaining, 30.0)))
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline or not self.is_running():
                raise self.fail(f"SSH login failed: {proc.stderr.strip()}")
            time.sleep(0.5)

    def restore(self, snapshot: Path, timeout: float = RESTORE_TIMEOUT_S) -> None:
        """Start from a copy of the booted snapshot and reset the guest clock; a restore that
        gets no SSH banner in time is tried once more from a fresh copy."""
        start = time.monotonic()
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            shutil.copyfile(snapshot, self.disk)
            self._launch(loadvm=True)
            try:
                self._wait_ready(timeout)
                break
            except VmError as error:
                if attempt == RESTORE_ATTEMPTS:
                    raise
                log(f"{self.name}: restore attempt {attempt} failed, trying again: {error}")
                self.stop()
                self.pid = 0
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

    def wait_stopped(self, timeout: float = 180.0) -> None:
        """Wait for QEMU to exit on its own (after a poweroff in the guest)."""
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise self.fail(f"qemu still running {timeout:.0f}s after poweroff")
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
            raise self.fail(f"boot_id unchanged after reboot ({after})")
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
        config = str(self.ssh_config)
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

    def testinfra_host(self, user: str = "root") -> Any:
        """Return a ``testinfra`` host for ``user``, over paramiko."""
        import testinfra

        return testinfra.get_host(
            f"paramiko://{user}@127.0.0.1:{self.port}",
            ssh_config=str(self.ssh_config),
            ssh_identity_file=str(self.key),
        )

    def pyinfra_host(self, user: str = "root", sudo: bool = False) -> HostEntry:
        """Return a pyinfra inventory entry ``(name, data)`` for ``user`` on this guest."""
        data = ssh_data(self.port, self.key, user)
        if sudo:
            data["_sudo"] = True
        return (self.name if user == "root" else f"{self.name}-{user}", data)

    def boot_id(self) -> str:
        """Return the guest kernel's boot_id."""
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    # --- KSM workload ---

    def launch_workload(
        self,
        mib: int = 64,
        fill: int | str = 0x5A,
        timeout: float = WORKLOAD_TIMEOUT_S,
        program: str = "python3",
        args: str = "",
    ) -> int:
        """Start a workload of ``mib`` MiB of ``fill`` (workload.py's FILL) marked mergeable,
        run by ``program`` (a python3, maybe copied under a QEMU name) with ``args`` after its
        own (ignored by it: e.g. QEMU's ``-name``); wait until it holds its memory; return its
        pid."""
        self.ssh(f"cat > {GUEST_WORKLOAD_PATH}", input=WORKLOAD_SCRIPT.read_text())
        tag = f"/run/ksm-guard-workload-{self._workloads}"
        self._workloads += 1
        self.ssh(
            f"nohup setsid {program} {GUEST_WORKLOAD_PATH} {mib} {tag}.pid {LIFETIME_S} {fill}"
            f" {args} >{tag}.log 2>&1 </dev/null &"
        )
        self.await_condition(
            f"grep -qx ready {tag}.log",
            timeout,
            f"cat {tag}.log",
            f"workload did not become ready in {timeout:.0f}s",
        )
        return int(self.ssh(f"cat {tag}.pid").stdout)

    def run_ksm_fast(self) -> None:
        """Switch ksmd on, scanning 10000 pages every 10 ms."""
        self.ssh(
            f"echo 10000 > {KSM_SYSFS}/pages_to_scan; echo 10 > {KSM_SYSFS}/sleep_millisecs;"
            f" echo 1 > {KSM_SYSFS}/run"
        )

    def start_workload(self, mib: int = 64, timeout: float = WORKLOAD_TIMEOUT_S) -> None:
        """Start a mergeable workload of ``mib`` MiB, run KSM fast, wait until it merged."""
        shared, sharing = f"{KSM_SYSFS}/pages_shared", f"{KSM_SYSFS}/pages_sharing"
        page_size, before = self.ssh(
            f"getconf PAGESIZE; echo $(($(cat {shared}) + $(cat {sharing})))"
        ).stdout.split()
        self.launch_workload(mib, timeout=timeout)
        self.run_ksm_fast()
        # max_page_sharing (256) caps sharers per KSM page: count shared + sharing, not sharing.
        # ksmtuned (debian flavour) may write run=0 meanwhile: put it back while we wait.
        pages = mib * 1024 * 1024 // int(page_size)
        target = int(before) + int(pages * 0.9)
        self.await_condition(
            f'[ "$(cat {KSM_SYSFS}/run)" = 1 ] || echo 1 > {KSM_SYSFS}/run;'
            f" [ $(($(cat {shared}) + $(cat {sharing}))) -ge {target} ]"
            f' && [ "$(cat {sharing})" -gt 0 ]',
            timeout,
            f"grep -H . {KSM_SYSFS}/*",
            f"{mib} MiB workload ({pages} pages) not merged within {timeout:.0f}s",
        )
