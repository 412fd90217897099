"""Ctrl-C during a fleet run: exit code 130 and one line on stderr, no tracebacks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from tests.localssh import SSHD, LocalSshd, inventory_source, silent_listener, start_sshd

BIN = Path(sys.executable).parent


def _interrupt(inventory: str, ready: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    """Run an audit of ``inventory``, send SIGINT once ``ready`` returns, collect the outcome."""
    command = [str(BIN / "ksm-guard"), "audit", "-i", inventory, "--connect-timeout", "60"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        ready()
        time.sleep(0.3)  # let it settle into the wait
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _assert_one_line(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 130, done.stderr
    assert done.stderr == "ksm-guard: interrupted\n"
    assert "Traceback" not in done.stdout + done.stderr


def test_ctrl_c_while_a_host_is_connecting(write_inventory) -> None:
    """The server accepts and never speaks: Ctrl-C while waiting for its SSH banner."""
    hung = silent_listener()
    hung.settimeout(30)
    accepted: list[socket.socket] = []
    data = {"ssh_hostname": "127.0.0.1", "ssh_port": hung.getsockname()[1]}
    data |= {"ssh_allow_agent": False, "ssh_look_for_keys": False}  # no key needed to hang
    inventory = write_inventory(inventory_source([("hung", data)]))
    try:
        done = _interrupt(inventory, lambda: accepted.append(hung.accept()[0]))
    finally:
        for peer in accepted:
            peer.close()
        hung.close()
    _assert_one_line(done)


@pytest.fixture
def hanging_sshd(tmp_path: Path) -> Iterator[tuple[LocalSshd, Path]]:
    """An sshd whose only key runs ``sleep`` instead of any command; its PID goes to a file."""
    if os.geteuid() != 0 or not SSHD.exists():
        pytest.skip(f"needs root and {SSHD} (make test-deps installs openssh-server)")
    daemon = start_sshd(tmp_path / "sshd")
    pidfile = tmp_path / "sleep.pid"
    key = (tmp_path / "sshd" / "client_key.pub").read_text()
    forced = f'command="echo $$ > {pidfile}; exec sleep 600" {key}'
    (tmp_path / "sshd" / "authorized_keys").write_text(forced)  # read at each login
    yield daemon, pidfile
    daemon.stop()
    pid = pidfile.read_text().strip() if pidfile.exists() else ""
    if pid.isdigit():
        with suppress(ProcessLookupError):  # sshd may have ended it with the session
            os.kill(int(pid), signal.SIGKILL)


def test_ctrl_c_while_a_command_hangs(
    hanging_sshd: tuple[LocalSshd, Path], write_inventory
) -> None:
    """Logged in, the state read never returns: Ctrl-C while waiting for its output."""
    daemon, pidfile = hanging_sshd
    inventory = write_inventory(inventory_source([daemon.host("stuck")]))

    def command_running() -> None:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)

    _assert_one_line(_interrupt(inventory, command_running))
