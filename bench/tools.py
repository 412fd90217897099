"""The contenders: each reads the same KSM picture from N hosts, as one controller command.

Every contender sends ``operations.facts.KSM_HOST_COMMAND`` (or, for the naive pyinfra line, the
same reads split over several built-in facts), writes what it read somewhere we can check, and
is judged by ``check()``: a run that did not read every host is an error, never a fast result.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyinfra.api.exceptions import FactProcessError

from ksm_guard.operations.facts import (
    KSM_DIR,
    KSM_HOST_COMMAND,
    PERSIST_PATH,
    UNITS,
    parse_ksm_host,
)

from .fleet import Fleet

BIN = Path(sys.executable).parent

# The naive pyinfra way: one built-in fact per read, as a first deploy script would do it.
NAIVE_FACTS = [
    "server.Command", f"command=cat {KSM_DIR}/run",
    "server.Command", f"command=cat {KSM_DIR}/pages_shared",
    "server.Command", f"command=cat {KSM_DIR}/pages_sharing",
    "server.Command", "command=grep -E '^(MemTotal|MemAvailable):' /proc/meminfo",
    "server.Command", "command=systemctl is-enabled " + " ".join(UNITS) + " || true",
    "files.File", f"path={PERSIST_PATH}",
]  # fmt: skip


@dataclass
class Cell:
    """Where one contender runs: the fleet, how many of its hosts, and a scratch folder."""

    fleet: Fleet
    hosts: int
    workdir: Path

    @property
    def names(self) -> list[str]:
        return [host.name for host in self.fleet.hosts[: self.hosts]]


@dataclass
class Invocation:
    """One controller command: argv, extra environment, stdin file, and how to judge its output."""

    argv: list[str]
    check: Callable[[int, str, str], str | None]  # (exit code, stdout, stderr) -> error or None
    env: dict[str, str] = field(default_factory=dict)
    stdin: Path | None = None


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    build: Callable[[Cell], Invocation]


def _parses(text: str) -> bool:
    """Whether ``text`` is a whole answer to ``KSM_HOST_COMMAND``, as ksm-guard would read it."""
    try:
        parse_ksm_host(text.splitlines())
    except FactProcessError:
        return False
    return True


def _expect_zero(expected: int, marker: str) -> Callable[[int, str, str], str | None]:
    def check(code: int, stdout: str, stderr: str) -> str | None:
        if code != 0:
            return f"exit {code}"
        found = stdout.count(marker)
        return None if found == expected else f"{found} of {expected} hosts answered"

    return check


def _openssh(cell: Cell, options: list[str]) -> Invocation:
    """``xargs -P N`` over ``ssh``. Each host's output goes to a file."""
    outdir = cell.workdir / "ssh-out"
    outdir.mkdir(exist_ok=True)
    for stale in outdir.iterdir():
        stale.unlink()
    names = cell.workdir / "hosts.txt"
    names.write_text("".join(f"{name}\n" for name in cell.names), encoding="utf-8")

    def check(code: int, stdout: str, stderr: str) -> str | None:
        if code != 0:
            return f"exit {code}"
        done = [p for p in outdir.iterdir() if _parses(p.read_text())]
        return None if len(done) == cell.hosts else f"{len(done)} of {cell.hosts} hosts answered"

    script = " ".join(["exec ssh", *options, '-F "$0" "$1" "$2" > "$3/$1.out"'])
    return Invocation(
        ["xargs", "-P", str(cell.hosts), "-I", "HOST", "sh", "-c", script,
         str(cell.fleet.ssh_config), "HOST", KSM_HOST_COMMAND, str(outdir)],
        check,
        stdin=names,
    )  # fmt: skip


def openssh(cell: Cell) -> Invocation:
    """The practical floor: OpenSSH as it comes (its default key exchange, sntrup761x25519)."""
    return _openssh(cell, [])


def openssh_curve25519(cell: Cell) -> Invocation:
    """OpenSSH with paramiko's key exchange (curve25519): the floor without post-quantum KEX."""
    return _openssh(cell, ["-o", "KexAlgorithms=curve25519-sha256"])


def ksm_guard(cell: Cell) -> Invocation:
    """ksm-guard itself; exit 1 (hosts non-compliant) is its normal answer here."""
    inventory = cell.fleet.pyinfra_inventory(cell.hosts, cell.workdir / "inventory.py")

    def check(code: int, stdout: str, stderr: str) -> str | None:
        if code not in (0, 1):
            return f"exit {code}"
        hosts = json.loads(stdout)["hosts"]
        read = [h for h in hosts if h["audit"] is not None]
        return None if len(read) == cell.hosts else f"{len(read)} of {cell.hosts} hosts read"

    argv = [str(BIN / "ksm-guard"), "audit", "-i", str(inventory), "--output", "json"]
    return Invocation([*argv, "--parallel", str(cell.hosts)], check)


def _pyinfra(cell: Cell, facts: list[str]) -> Invocation:
    inventory = cell.fleet.pyinfra_inventory(cell.hosts, cell.workdir / "inventory.py")
    wanted = sum(1 for word in facts if "=" not in word)

    def check(code: int, stdout: str, stderr: str) -> str | None:
        """pyinfra logs each fact's data to stderr as a JSON object keyed by host."""
        if code != 0:
            return f"exit {code}"
        blocks = stderr.split("--> Fact data for: ")[1:]
        decoder = json.JSONDecoder()
        for block in blocks:
            # The header line echoes the fact's arguments (the command has braces): skip it.
            data, _ = decoder.raw_decode(block[block.index("\n") + 1 :].lstrip())
            if len(data) != cell.hosts:
                return f"{len(data)} of {cell.hosts} hosts answered"
        return None if len(blocks) == wanted else f"{len(blocks)} of {wanted} facts gathered"

    argv = [str(BIN / "pyinfra"), str(inventory), "fact", *facts]
    return Invocation([*argv, "--parallel", str(cell.hosts), "-y"], check)


def pyinfra_fact(cell: Cell) -> Invocation:
    """Bare pyinfra, one ``server.Command`` fact running the same command: the engine's floor."""
    return _pyinfra(cell, ["server.Command", f"command={KSM_HOST_COMMAND}"])


def pyinfra_naive(cell: Cell) -> Invocation:
    """pyinfra with one built-in fact per read: six round trips per host."""
    return _pyinfra(cell, NAIVE_FACTS)


def ansible(cell: Cell) -> Invocation:
    """Ansible ad-hoc ``shell`` with pipelining, forks = N, no fact gathering, no ControlPersist."""
    home = cell.workdir / "ansible"
    home.mkdir(exist_ok=True)
    inventory = home / "hosts.ini"
    inventory.write_text("[bench]\n" + "".join(f"{n}\n" for n in cell.names), encoding="utf-8")
    config = home / "ansible.cfg"
    config.write_text(
        "\n".join(
            (
                "[defaults]",
                "host_key_checking = True",
                "interpreter_python = /usr/bin/python3",
                "gathering = explicit",
                f"local_tmp = {home / 'tmp'}",
                "[ssh_connection]",
                "pipelining = True",
                # The fleet's ssh_config sets the key, known_hosts and ControlMaster=no, so that
                # no connection outlives a run (ControlPersist would speed up repetitions only).
                f"ssh_args = -F {cell.fleet.ssh_config}",
                "",
            )
        ),
        encoding="utf-8",
    )
    env = {
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    argv = [str(BIN / "ansible"), "all", "-i", str(inventory), "-f", str(cell.hosts)]
    return Invocation(
        [*argv, "-m", "shell", "-a", KSM_HOST_COMMAND],
        _expect_zero(cell.hosts, "| CHANGED | rc=0"),
        env=env,
    )


CONTENDERS = [
    Contender("ksm-guard", "ksm-guard audit", ksm_guard),
    Contender("openssh", "OpenSSH xargs -P", openssh),
    Contender("openssh-c25519", "OpenSSH xargs -P, curve25519", openssh_curve25519),
    Contender("pyinfra", "pyinfra server.Command", pyinfra_fact),
    Contender("pyinfra-naive", "pyinfra, 6 built-in facts", pyinfra_naive),
    Contender("ansible", "Ansible shell, pipelining", ansible),
]
FLOOR = "openssh"
