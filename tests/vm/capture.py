"""Capture ``KsmHost`` fact fixtures from real guests, before and after ``ksm-guard disable``."""

# ``python -m tests.vm capture --release trixie`` restores a debian and a pve guest, merges a
# workload's pages (ksmtuned on, run=1), reads the fact command's output over SSH as root, runs
# ``ksm-guard disable --yes`` on both, reads it again, and writes one fixture per guest and moment
# into tests/facts/facts.KsmHost/, named ``debian<N>_<kernel>_<flavour>_<moment>.yaml``. Each file
# says where it was captured; its ``fact`` is what ``KsmHost.process`` makes of the output, so the
# unit tier (tests/test_facts.py) checks the parser against it.

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ksm_guard.operations.facts import KSM_HOST_COMMAND, KsmHost
from tests.vm.guest import Guest
from tests.vm.inventory import write_inventory
from tests.vm.session import VmSession, parallel
from tests.vm.util import VmError

FIXTURES = Path(__file__).resolve().parents[1] / "facts" / "facts.KsmHost"
DEBIAN_VERSIONS = {"bookworm": 12, "trixie": 13}
CAPTURED_FLAVOURS = ("debian", "pve")
WORKLOAD_MIB = 64


def read_fact(guest: Guest) -> tuple[list[str], Any]:
    """Run the fact command on ``guest`` as root; return its output lines and the parsed fact."""
    output = guest.ssh(KSM_HOST_COMMAND).stdout.splitlines()
    return output, KsmHost().process(output)


def fixture_name(release: str, kernel: str, flavour: str, moment: str) -> str:
    """``debian13_6.12_pve_before_disable.yaml`` from the release, ``uname -r`` and the moment."""
    found = re.match(r"\d+\.\d+", kernel)
    if found is None:
        raise VmError(f"kernel release {kernel!r} has no major.minor")
    return f"debian{DEBIAN_VERSIONS[release]}_{found.group()}_{flavour}_{moment}.yaml"


def write_fixture(path: Path, header: str, output: list[str], fact: Any) -> None:
    """Write a fixture as the others are laid out: a comment, ``output``, then ``fact``."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(
        {"output": output, "fact": fact}, sort_keys=False, allow_unicode=True, width=100
    )
    path.write_text(comment + body)


def _disable(guest: Guest, workdir: Path) -> None:
    """Run ``ksm-guard disable --yes`` on ``guest`` through the installed console script."""
    inventory = write_inventory(workdir / f"capture-{guest.name}.py", [guest])
    cli = Path(sys.executable).with_name("ksm-guard")
    done = subprocess.run(
        [str(cli), "disable", "--yes", "-i", str(inventory)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise VmError(f"ksm-guard disable on {guest.name} exited {done.returncode}: {done.stderr}")


def capture(session: VmSession, release: str, out: Path = FIXTURES) -> list[Path]:
    """Capture the before/after-disable fixtures of ``release``'s debian and pve guests."""
    guests = session.start_many(CAPTURED_FLAVOURS, release=release)
    parallel(lambda guest: guest.start_workload(WORKLOAD_MIB), list(guests.values()))
    written = []
    for moment in ("before_disable", "after_disable"):
        if moment == "after_disable":
            parallel(lambda guest: _disable(guest, session.workdir), list(guests.values()))
        for guest in guests.values():
            output, fact = read_fact(guest)
            kernel = guest.ssh("uname -r").stdout.strip()
            systemd = guest.ssh("systemctl --version | head -n 1").stdout.strip()
            path = out / fixture_name(release, kernel, guest.flavour, moment)
            what = "before" if moment == "before_disable" else "after"
            header = (
                f"Captured from ksm-guard's {release} (Debian {DEBIAN_VERSIONS[release]}) test VM,"
                f" {guest.flavour} flavour (tests/vm/recipe.py),\n"
                f"kernel {kernel}, {systemd},\n"
                f"{what} `ksm-guard disable --yes`, a {WORKLOAD_MIB} MiB workload merged,\n"
                f"by `python -m tests.vm capture --release {release}` (tests/vm/capture.py)."
            )
            write_fixture(path, header, output, fact)
            written.append(path)
    session.release(guests.values())
    return written
