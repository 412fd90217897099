"""Shared helpers: inventories written for a test, the installed console scripts, merged pages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.localksm import locked, read, write
from tests.localssh import SSHD, LocalSshd, start_sshd

BIN = Path(sys.executable).parent
WORKLOAD = Path(__file__).parent / "vm" / "workload.py"
MIB = 64  # merged by the merged_pages fixture


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


def ksm_guard(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as an admin would."""
    return subprocess.run(
        [str(BIN / "ksm-guard"), *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def merged_pages() -> Iterator[int]:
    """A process holding identical MADV_MERGEABLE pages, merged by a running ksmd.

    Yields the workload's pid. Afterwards the process is gone, nothing is left merged (with ksmd
    stopped, an exited process's KSM pages stay counted until an unmerge) and run reads 0.
    """
    with locked():  # the kernel's KSM is one for the machine: one user at a time
        knobs = {name: read(name) for name in ("pages_to_scan", "sleep_millisecs")}
        write("run", 2)  # start from nothing merged
        write("run", 0)
        workload = subprocess.Popen(
            [sys.executable, str(WORKLOAD), str(MIB), "", "600"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert workload.stdout is not None and workload.stdout.readline().strip() == "ready"
            write("pages_to_scan", 10000)
            write("sleep_millisecs", 10)
            write("run", 1)
            deadline = time.monotonic() + 60
            while read("pages_sharing") < MIB * 256 // 2:
                assert time.monotonic() < deadline, (
                    f"ksmd merged only {read('pages_sharing')} pages"
                )
                time.sleep(0.2)
            yield workload.pid
        finally:
            workload.kill()
            workload.wait(timeout=30)
            write("run", 0)
            write("run", 2)
            write("run", 0)
            for name, value in knobs.items():
                write(name, value)
