"""Shared helpers: inventories written for a test, and the installed console scripts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.localssh import SSHD, LocalSshd, start_sshd

BIN = Path(sys.executable).parent


@pytest.fixture
def write_inventory(tmp_path: Path):
    """Write a pyinfra inventory file from its Python source and return its path."""

    def write(source: str, name: str = "inv.py") -> str:
        path = tmp_path / name
        path.write_text(source)
        return str(path)

    return write


@pytest.fixture(scope="session")
def local_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSshd]:
    """An sshd on a loopback port: this machine over real SSH, under as many names as wanted."""
    if os.geteuid() != 0 or not SSHD.exists():
        pytest.skip(f"needs root and {SSHD} (make test-deps installs openssh-server)")
    daemon = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield daemon
    daemon.stop()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every command the @local connector runs, recorded as it is sent."""
    from pyinfra.connectors.local import LocalConnector

    commands: list[str] = []
    original = LocalConnector.run_shell_command

    def counting(self, command, *args, **kwargs):  # type: ignore[no-untyped-def]
        commands.append(str(command))
        return original(self, command, *args, **kwargs)

    monkeypatch.setattr(LocalConnector, "run_shell_command", counting)
    return commands
