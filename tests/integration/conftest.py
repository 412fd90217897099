"""Fixtures for the real-VM integration tests: a shared fleet and pristine throwaway guests."""

# - ``release`` (module): the Debian release of the module's guests, ``trixie`` (Debian 13) or
#   ``bookworm`` (Debian 12). Every test using a guest runs on the primary release (trixie) and
#   shows it in its id (``test_x[trixie]``); ``@pytest.mark.releases("bookworm", "trixie")``
#   runs it on each release named. A test that takes ``release`` as an argument can ask for it.
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
from tests.vm.recipe import FLAVOURS, PRIMARY_RELEASE, RELEASES
from tests.vm.session import VmSession, keep_vms_from_env

HERE = Path(__file__).resolve().parent
REQUIRED_TOOLS = (
    QEMU,
    "qemu-img",
    "debootstrap",
    "mkfs.ext4",
    "zstd",
    "ssh",
    "ssh-keygen",
    "dpkg-deb",
)

FreshGuest = Callable[..., Guest]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register --keep-vms."""
    parser.getgroup("ksm-guard VMs").addoption(
        "--keep-vms",
        action="store_true",
        default=False,
        help="leave the test VMs running after the session (python -m tests.vm reap --all)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test with a guest on the releases its ``releases`` mark names (default: the
    primary one), as a module-scoped parameter: a module's guests are set up once per release."""
    if "release" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("releases")
    releases = marker.args if marker else (PRIMARY_RELEASE,)
    unknown = sorted(set(releases) - set(RELEASES))
    if unknown or not releases:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: releases {unknown or '()'}")
    metafunc.parametrize("release", releases, scope="module")


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin that puts each module's tests back in their written order."""
    config.pluginmanager.register(_DefinitionOrder(), "ksm-guard-vm-definition-order")


class _DefinitionOrder:
    """pytest groups the tests of a module-scoped parameter (the release) together, and in doing
    so may move a test after others of its module (test_vms.py's audit after its unmerge). Run
    after that: within each run of tests of one module and release, the order they are written
    in (a test's parameters keep theirs)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        start = 0
        while start < len(items):
            key = (items[start].path, _release_of(items[start]))
            end = start
            while end < len(items) and (items[end].path, _release_of(items[end])) == key:
                end += 1
            items[start:end] = sorted(items[start:end], key=lambda item: item.reportinfo()[1] or 0)
            start = end


def _release_of(item: pytest.Item) -> str:
    """The release a collected VM test runs on."""
    callspec = getattr(item, "callspec", None)
    return str(callspec.params.get("release", PRIMARY_RELEASE)) if callspec else PRIMARY_RELEASE


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration with ``vm``; put the users of one release's fleet,
    and of one module's group, in one xdist group per release (so that each release's share can
    go to another worker)."""
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)
            item.user_properties.append(("release", _release_of(item)))  # reports carry it
            group = item.get_closest_marker("xdist_group")
            if "fleet" in getattr(item, "fixturenames", ()):
                name = "fleet"
            elif group is not None:
                name = group.args[0] if group.args else group.kwargs["name"]
            else:
                continue
            grouped = pytest.mark.xdist_group(f"{name}-{_release_of(item)}")
            item.add_marker(grouped, append=False)  # the closest mark: the one xdist reads


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line: the VM tests of each release, how many and their time (setup, call and
    teardown summed over the workers), for the README's table."""
    totals: dict[str, tuple[int, float]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if not isinstance(report, pytest.TestReport):
                continue  # warnings and collection reports
            release = str(dict(report.user_properties).get("release", ""))
            if not release:
                continue
            count, seconds = totals.get(release, (0, 0.0))
            totals[release] = (count + (report.when == "call"), seconds + report.duration)
    if totals:
        terminalreporter.write_line(
            "VM tests by release (test time summed over the workers): "
            + "; ".join(f"{name} {n} tests, {s:.0f} s" for name, (n, s) in sorted(totals.items()))
        )


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


@pytest.fixture(scope="module")
def release() -> str:
    """The Debian release of this module's guests (set by ``pytest_generate_tests``)."""
    return PRIMARY_RELEASE


@pytest.fixture(scope="session")
def vm_session(request: pytest.FixtureRequest) -> Iterator[VmSession]:
    """Own every VM of the test session; stop them all at its end."""
    _require_vm_tooling()
    with VmSession(keep=_keep_vms(request.config)) as session:
        yield session


@pytest.fixture(scope="module")
def fleet(vm_session: VmSession, release: str) -> Iterator[dict[str, Guest]]:
    """Boot one guest per flavour (debian, pve, bare) of ``release`` for the module's tests;
    read-only use. Keyed by flavour."""
    guests = vm_session.start_many(FLAVOURS, release=release)
    yield {guest.flavour: guest for guest in guests.values()}
    vm_session.release(guests.values())


@pytest.fixture
def fresh_guest(vm_session: VmSession, release: str) -> Iterator[FreshGuest]:
    """Return a factory of pristine guests of ``release`` restored from the snapshot; stop them
    afterwards."""
    started: list[Guest] = []

    def start(flavour: str, memory_mib: int | None = None, name: str | None = None) -> Guest:
        guest = vm_session.start(flavour, name=name, memory_mib=memory_mib, release=release)
        started.append(guest)
        return guest

    yield start
    vm_session.release(started)


@pytest.fixture
def fresh_fleet(vm_session: VmSession, release: str) -> Iterator[dict[str, Guest]]:
    """Start one pristine guest per flavour of ``release`` in parallel (keyed by flavour); stop
    them after the test."""
    guests = vm_session.start_many(FLAVOURS, release=release)
    yield {guest.flavour: guest for guest in guests.values()}
    vm_session.release(guests.values())
