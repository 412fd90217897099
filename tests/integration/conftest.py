"""Fixtures for the real-VM integration tests: a shared fleet and pristine throwaway guests."""

# - ``fleet`` (module): one running guest per flavour, ``{"debian": g, "pve": g, "bare": g}``.
#   Shared by the module's tests: use it read-only (audits, checks). Stopped after the module:
#   an idle pve guest alone costs a quarter of a host core (ksmtuned every 2 s under TCG).
# - ``fresh_guest`` (function): factory ``fresh_guest("pve", memory_mib=None, name=None)``
#   returning a pristine guest restored from the booted snapshot (~3 s); stopped after the test.
#   Use it for anything that changes the guest (disable, unmerge, reboot).
# - ``fresh_fleet`` (function): one pristine guest per flavour, started in parallel.
# - ``vm_session`` (session): the ``VmSession`` behind them all.
#
# State of a guest just restored: debian reads run=1 (ksm.service) until ksmtuned's first
# adjustment writes run=0 about 60 s later; pve reads run=1 and its ksmtuned keeps it so (2 s
# interval, tuned to switch KSM on); bare reads run=0, no ksmtuned. Tests that need another
# state set it themselves (``Guest.start_workload`` merges pages).
#
# ``--keep-vms`` (or ``KSM_GUARD_KEEP_VMS=1``) leaves every VM running, the per-test ones too,
# for debugging; stop them later with ``python -m tests.vm reap --all``. The option is only
# known when pytest is pointed at ``tests/integration`` (or a file in it); the variable always
# works. Fixtures hand guests back with ``vm_session.release``, which honours both.
#
# ``make test-vm`` runs the tests on pytest-xdist workers (``--dist loadgroup``), each with its
# own ``vm_session``: the tests using ``fleet`` form one group, so that one worker boots it, and
# a module whose tests build on each other marks itself with one ``xdist_group`` too.

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.guest import Guest
from tests.vm.qemu import QEMU
from tests.vm.recipe import FLAVOURS
from tests.vm.session import VmSession, keep_vms_from_env

HERE = Path(__file__).resolve().parent
REQUIRED_TOOLS = (QEMU, "qemu-img", "debootstrap", "mkfs.ext4", "ssh", "ssh-keygen", "dpkg-deb")

FreshGuest = Callable[..., Guest]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register --keep-vms."""
    parser.getgroup("ksm-guard VMs").addoption(
        "--keep-vms",
        action="store_true",
        default=False,
        help="leave the test VMs running after the session (python -m tests.vm reap --all)",
    )


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration with ``vm``; put the fleet's users in one group."""
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)
            if "fleet" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group("fleet"))


def _keep_vms(config: pytest.Config) -> bool:
    """Tell whether the VMs should outlive the session."""
    return bool(config.getoption("--keep-vms", default=False)) or keep_vms_from_env()


def _require_vm_tooling() -> None:
    """Skip (fail under CI) when this machine cannot build or boot the test VMs."""
    from gevent import monkey

    if monkey.is_module_patched("subprocess"):
        pytest.fail(
            "gevent has patched this process (pyinfra-testing imports pyinfra_cli): "
            "run the VM tests apart, `make test-vm` or `pytest tests/integration`"
        )
    problems = [f"{tool} not found" for tool in REQUIRED_TOOLS if not shutil.which(tool)]
    if os.geteuid() != 0:
        problems.append("not root (debootstrap and chroot need it)")
    if problems:
        message = "cannot run VM tests: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def vm_session(request: pytest.FixtureRequest) -> Iterator[VmSession]:
    """Own every VM of the test session; stop them all at its end."""
    _require_vm_tooling()
    with VmSession(keep=_keep_vms(request.config)) as session:
        yield session


@pytest.fixture(scope="module")
def fleet(vm_session: VmSession) -> Iterator[dict[str, Guest]]:
    """Boot one guest per flavour (debian, pve, bare) for the module's tests; read-only use."""
    guests = vm_session.start_many(FLAVOURS)
    yield guests
    vm_session.release(guests.values())


@pytest.fixture
def fresh_guest(vm_session: VmSession) -> Iterator[FreshGuest]:
    """Return a factory of pristine guests restored from the snapshot; stop them afterwards."""
    started: list[Guest] = []

    def start(flavour: str, memory_mib: int | None = None, name: str | None = None) -> Guest:
        guest = vm_session.start(flavour, name=name, memory_mib=memory_mib)
        started.append(guest)
        return guest

    yield start
    vm_session.release(started)


@pytest.fixture
def fresh_fleet(vm_session: VmSession) -> Iterator[dict[str, Guest]]:
    """Start one pristine guest per flavour in parallel; stop them after the test."""
    guests = vm_session.start_many(FLAVOURS)
    yield guests
    vm_session.release(guests.values())
