"""N SSH "hosts" on this machine: one sshd each on a loopback port, optionally behind a delay.

With a delay, clients reach each sshd through ``bench.delay`` (a relay adding the one-way
latency), since this kernel has no ``tc netem``. Every sshd and the relay are children of this
process, each started in its own session and killed by its PID (and process group) on
``stop()``. Keys, configuration and logs live in one temporary directory that ``stop()`` removes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .netutil import free_port, wait_for_ssh_banner

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
MAX_HOSTS = 250
READY_TIMEOUT_S = 30.0


class FleetError(RuntimeError):
    """The fleet could not be set up."""


@dataclass(frozen=True)
class SshHost:
    """One benchmark host as a client sees it."""

    name: str
    address: str
    port: int

    @property
    def known_hosts_name(self) -> str:
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FleetError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


class Fleet:
    """``size`` sshd hosts; ``delay_ms`` > 0 puts that one-way delay between clients and them."""

    def __init__(self, size: int, delay_ms: int = 0, parent: Path | None = None) -> None:
        if not 1 <= size <= MAX_HOSTS:
            raise ValueError(f"fleet size must be 1..{MAX_HOSTS}, not {size}")
        self.size = size
        self.delay_ms = delay_ms
        self.parent = parent
        self.workdir = Path()
        self.hosts: list[SshHost] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    # Files every client uses.
    @property
    def client_key(self) -> Path:
        return self.workdir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    @property
    def label(self) -> str:
        return f"{2 * self.delay_ms} ms RTT" if self.delay_ms else "loopback"

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Generate keys, start one sshd per host, wait until every one answers."""
        self.workdir = Path(tempfile.mkdtemp(prefix="ksm-bench-fleet-", dir=self.parent))
        host_key = self.workdir / "host_ed25519"
        for key in (host_key, self.client_key):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ksm-bench", "-f", str(key))
        (self.workdir / "authorized_keys").write_text(
            Path(f"{self.client_key}.pub").read_text(encoding="utf-8"), encoding="utf-8"
        )
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory

        ports = [free_port() for _ in range(2 * self.size)]
        sshd_ports, relay_ports = ports[: self.size], ports[self.size :]
        launcher = self._clean_home_launcher()
        for i, port in enumerate(sshd_ports, start=1):
            config = self._write_sshd_config(f"h{i:03d}", port, host_key)
            self._spawn([*launcher, SSHD, "-D", "-e", "-f", str(config)], f"h{i:03d}.sshd.log")
        if self.delay_ms:
            mapping = [f"{a}:{b}" for a, b in zip(relay_ports, sshd_ports, strict=True)]
            relay = self._spawn(
                [sys.executable, "-m", "bench.delay", str(self.delay_ms), *mapping],
                "relay.log",
                ready_line=True,
            )
            if relay.stdout is None or relay.stdout.readline() != b"ready\n":
                raise FleetError(f"the delay relay did not start: {self._log('relay.log')}")
        client_ports = relay_ports if self.delay_ms else sshd_ports
        self.hosts = [
            SshHost(f"h{i:03d}", "127.0.0.1", port) for i, port in enumerate(client_ports, start=1)
        ]
        self._wait_ready()
        public = host_key.with_suffix(".pub").read_text(encoding="utf-8").split()
        self.known_hosts.write_text(
            "".join(f"{h.known_hosts_name} {public[0]} {public[1]}\n" for h in self.hosts),
            encoding="utf-8",
        )
        self._write_ssh_config()

    def _clean_home_launcher(self) -> list[str]:
        """A prefix that runs sshd seeing an empty ``~/.bashrc``, in a private mount namespace.

        sshd runs every remote command through the user's shell, and bash sources ``~/.bashrc``
        when sshd starts it. This machine's root ``.bashrc`` runs ``pyenv init`` (~0.2 s per
        remote command), which no hypervisor host does: the benchmark hosts get an empty one.
        Nothing changes outside those sshd processes.
        """
        bashrc = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".bashrc"
        if not bashrc.is_file() or shutil.which("unshare") is None:
            return []
        empty = self.workdir / "empty_bashrc"
        empty.touch()
        return [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$1" && shift && exec "$@"', str(empty), str(bashrc),
        ]  # fmt: skip

    def _spawn(
        self, argv: list[str], log_name: str, ready_line: bool = False
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / log_name).open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if ready_line else log,
                stderr=log,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        self.processes.append(process)
        return process

    def _log(self, name: str) -> str:
        return (self.workdir / name).read_text(errors="replace").strip()

    def _write_sshd_config(self, name: str, port: int, host_key: Path) -> Path:
        path = self.workdir / f"{name}.sshd_config"
        path.write_text(
            "\n".join(
                (
                    f"ListenAddress 127.0.0.1:{port}",
                    f"HostKey {host_key}",
                    "PidFile none",
                    f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "UseDNS no",
                    "StrictModes no",
                    "MaxStartups 1000",
                    "LogLevel ERROR",
                    "",
                )
            ),
            encoding="utf-8",
        )
        return path

    def _write_ssh_config(self) -> None:
        """An OpenSSH client config naming every host, used by the ssh fan-out and Ansible."""
        lines = []
        for host in self.hosts:
            lines += [f"Host {host.name}", f"  HostName {host.address}", f"  Port {host.port}"]
        lines += [
            "Host *",
            "  User root",
            f"  IdentityFile {self.client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ControlMaster no",
            "  ControlPath none",
            "  LogLevel ERROR",
            "",
        ]
        self.ssh_config.write_text("\n".join(lines), encoding="utf-8")

    def _wait_ready(self) -> None:
        """Every sshd sends its banner, or the fleet fails with the first sshd log that says why."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        for host, process in zip(self.hosts, self.processes, strict=False):  # the relay is last

            def check(host: SshHost = host, process: subprocess.Popen[bytes] = process) -> None:
                if process.poll() is not None:
                    log = self._log(f"{host.name}.sshd.log")
                    raise FleetError(f"sshd for {host.name} exited {process.returncode}: {log}")

            try:
                wait_for_ssh_banner(
                    host.port, deadline - time.monotonic(), check=check, host=host.address
                )
            except TimeoutError:
                raise FleetError(
                    f"sshd for {host.name} did not answer in {READY_TIMEOUT_S:.0f} s"
                ) from None

    def stop(self) -> None:
        """Kill every sshd we started (and its sessions) and the relay, delete the files."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its own session: sshd and its children
        for process in self.processes:
            if process.stdout is not None:
                process.stdout.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []
        if self.workdir != Path() and self.workdir.is_dir():
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.hosts = []

    def pyinfra_inventory(self, count: int, path: Path) -> Path:
        """A pyinfra inventory file of the first ``count`` hosts (ksm-guard reads the same)."""
        data = {
            "ssh_user": "root",
            "ssh_key": str(self.client_key),
            "ssh_known_hosts_file": str(self.known_hosts),
            "ssh_strict_host_key_checking": "yes",
        }
        entries = [
            (h.name, {"ssh_hostname": h.address, "ssh_port": h.port, **data})
            for h in self.hosts[:count]
        ]
        path.write_text(f"hosts = {entries!r}\n", encoding="utf-8")
        return path
