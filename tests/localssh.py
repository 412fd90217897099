"""This machine over real SSH: an sshd on a loopback port, reached under several host names."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.netutil import free_port, wait_for_ssh_banner

SSHD = Path("/usr/sbin/sshd")

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 500
MaxSessions 100
LogLevel FATAL
"""


@dataclass
class LocalSshd:
    """A running sshd that lets root in with ``key``."""

    port: int
    key: Path
    process: subprocess.Popen[bytes]

    def host(self, name: str, **data: Any) -> tuple[str, dict[str, Any]]:
        """An inventory entry: this machine, reached as ``name`` through this sshd."""
        return name, {**ssh_data(self.port, self.key), **data}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def ssh_data(port: int, key: Path, user: str = "root") -> dict[str, Any]:
    """pyinfra host data for ``user`` on 127.0.0.1:``port``, without known-hosts checks."""
    return {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": port,
        "ssh_user": user,
        "ssh_key": str(key),
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
    }


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def start_sshd(workdir: Path) -> LocalSshd:
    """Start an sshd on a free loopback port, with fresh host and client keys in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    _keygen(workdir / "host_key")
    _keygen(workdir / "client_key")
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(SSHD_CONFIG.format(port=port, dir=workdir))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)])

    def check() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}")

    try:
        wait_for_ssh_banner(port, 10.0, check=check)
    except BaseException:
        process.kill()
        raise
    return LocalSshd(port, workdir / "client_key", process)


def silent_listener() -> socket.socket:
    """A loopback port that accepts connections and never answers: a hung SSH server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def inventory_source(hosts: list[tuple[str, dict[str, Any]]]) -> str:
    """A pyinfra inventory file holding ``hosts`` in order."""
    return f"hosts = {hosts!r}\n"
