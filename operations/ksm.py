"""Operations that switch KSM off (and back on) on a host: thin adapters over ``plan``."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, cast
from weakref import WeakKeyDictionary

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.context import ctx_host

from . import plan as planner
from .facts import KsmHost
from .model import DEFAULT_MAX_FRACTION, HostState, Mode, Options, Policy
from .report import audit_line, audit_record
from .watch import DEFAULT_INTERVAL, DEFAULT_TEXTFILE_DIR, WatchConfig
from .watch import host_label as watch_host

_STATE_KEYS = tuple(HostState.__required_keys__ | HostState.__optional_keys__)

# Reads of the KsmHost fact, per pyinfra State, by (host, executing). pyinfra does not cache
# facts. While a run is prepared nothing changes on a host, so the operations of one mode share
# a single read; while executing, a read stays good until an operation has run commands.
_reads: WeakKeyDictionary[Any, dict[tuple[Any, bool], HostState]] = WeakKeyDictionary()
# The reason each refused host was given, per pyinfra State: the engine reports it.
_refusals: WeakKeyDictionary[Any, dict[Any, str]] = WeakKeyDictionary()


def _key() -> tuple[Any, bool]:
    # ctx_host.get() is the Host itself: the ``host`` proxy hashes as whichever host is current.
    return ctx_host.get(), bool(host.state.is_executing)


def host_state() -> HostState | None:
    """The current host's KSM state, or None (after a noop) when it could not be read."""
    reads = _reads.setdefault(host.state, {})
    key = _key()
    if key in reads:
        return reads[key]
    fact = host.get_fact(KsmHost)
    if fact is None:
        host.noop("KSM state could not be read")
        return None
    # A copy by key: pyinfra-testing hands operations a wrapper, pyinfra the parsed dict.
    source = cast(Mapping[str, Any], fact)
    copied = {name: source[name] for name in _STATE_KEYS if name in source}
    state = cast(HostState, copied)
    reads[key] = state
    return state


def remember_state(state: HostState) -> None:
    """Use ``state`` as the current host's read for the rest of this phase."""
    _reads.setdefault(host.state, {})[_key()] = state


def forget_state() -> None:
    """The current host changed: the next operation reads its state afresh."""
    _reads.setdefault(host.state, {}).pop(_key(), None)


def log_change(text: str) -> None:
    """Log one from → to line of an operation's diff, so that dry runs show it."""
    logger.info(f"{host.print_prefix}{text}")


def refuse(state: Any, host: Any, message: str) -> bool:
    """Fail ``host`` with ``message`` without running anything on it."""
    _refusals.setdefault(state, {})[host] = message
    logger.error(f"{host.print_prefix}{message}")
    return False


def refusal_command(message: str) -> FunctionCommand:
    """A command that fails the host with ``message`` and runs nothing on it."""
    return FunctionCommand(refuse, (message,), {})


def refusal_of(state: Any, host: Any) -> str | None:
    """The reason ``host`` was refused while ``state`` executed, if it was."""
    return _refusals.get(state, {}).get(host)


def pyinfra_command(command: planner.Command) -> StringCommand:
    """A planned command as pyinfra runs it: every word quoted."""
    words: list[Any] = [QuoteString(word) for word in command.argv]
    if command.stdout_to is not None:
        words += [">", QuoteString(command.stdout_to)]
    return StringCommand(*words)


def apply(part: planner.PartPlan) -> Generator[Any, None, None]:
    """Log a part's diff, then yield its commands, its refusal, or a noop with its state."""
    for step in part.steps:
        log_change(step.change)
    if part.refusal is not None:
        yield refusal_command(part.refusal.reason)
        return
    if not part.steps:
        host.noop(part.noop or "nothing to do")
        return
    for step in part.steps:
        for command in step.commands:
            yield pyinfra_command(command)
    forget_state()  # reached only when executing, after the commands ran


@operation()
def services_disabled(mask: bool = False) -> Generator[Any, None, None]:
    """
    Stop and disable ``ksmtuned.service`` and ``ksm.service`` wherever they are installed.

    + mask: also mask both units, so that a package reinstall cannot bring them back

    .. code:: python

        ksm.services_disabled(name="Switch off ksmtuned and ksm.service", mask=True)
    """
    state = host_state()
    if state is not None:
        yield from apply(planner.units_off(state, mask))


@operation()
def merging_stopped() -> Generator[Any, None, None]:
    """
    Stop ksmd merging pages: write ``run=0`` when ``run`` reads 1 (merged pages stay merged).

    .. code:: python

        ksm.merging_stopped(name="Stop KSM merging")
    """
    state = host_state()
    if state is not None:
        yield from apply(planner.merging_stopped(state))


@operation()
def boot_persisted(present: bool = True) -> Generator[Any, None, None]:
    """
    Keep ``run=0`` across reboots with a systemd-tmpfiles entry, or remove that entry.

    + present: whether the entry should exist

    .. code:: python

        ksm.boot_persisted(name="Keep KSM off at boot", present=True)
    """
    state = host_state()
    if state is not None:
        yield from apply(planner.boot_persisted(state, present))


@operation()
def unmerged(
    max_fraction: float = DEFAULT_MAX_FRACTION, force: bool = False
) -> Generator[Any, None, None]:
    """
    Unmerge every KSM page (``run=2``) once memory allows it, and prove the counters read 0.

    + max_fraction: refuse when the unmerge needs more than this share of ``MemAvailable``
    + force: unmerge even when the memory preflight refuses

    .. code:: python

        ksm.unmerged(name="Unmerge KSM pages", max_fraction=0.5)
    """
    state = host_state()
    if state is not None:
        yield from apply(planner.unmerged(state, max_fraction, force))


@operation()
def services_enabled() -> Generator[Any, None, None]:
    """
    Roll back: unmask, enable and start ``ksm.service`` and ``ksmtuned.service`` where installed.

    .. code:: python

        ksm.services_enabled(name="Switch ksmtuned back on")
    """
    state = host_state()
    if state is not None:
        yield from apply(planner.units_on(state))


@operation()
def watch_installed(
    present: bool | None = True,
    host_label: str = "",
    interval: int = DEFAULT_INTERVAL,
    heal: bool = False,
    textfile_dir: str = DEFAULT_TEXTFILE_DIR,
) -> Generator[Any, None, None]:
    """
    Install the drift watch (``ksm-guard-watch.service`` and ``.timer`` and their POSIX sh
    script, which writes the host's KSM metrics for node_exporter), or remove it.

    + present: install (True), remove (False), or leave it as it is (None)
    + host_label: the ``host`` label of its metrics (default: the inventory name)
    + interval: seconds between runs (also one at boot)
    + heal: on drift write run=0 and stop and disable the KSM units, counting each heal
    + textfile_dir: node_exporter's textfile directory (created when missing)

    .. code:: python

        ksm.watch_installed(name="Install the drift watch", present=True, heal=True)
    """
    state = host_state()
    if state is not None:
        label = host_label or watch_host(host.name)
        config = WatchConfig(label, interval, heal, textfile_dir)
        yield from apply(planner.watch_installed(state, present, config))


@operation()
def preflight(
    mode: str,
    mask: bool = False,
    force: bool = False,
    max_fraction: float = DEFAULT_MAX_FRACTION,
    vmids: list[int] | None = None,
) -> Generator[Any, None, None]:
    """
    Fail the host before anything changes on it when the plan of ``mode`` refuses it.

    Run first: when executing it reads the host afresh, so a host whose memory shrank since the
    plan was shown is refused as a whole, not after its units were already switched off.

    + mode: the ksm-guard mode whose plan is checked (``disable``, ``unmerge``, ...)
    + mask, force, max_fraction, vmids: that mode's options

    .. code:: python

        ksm.preflight(name="Check the unmerge plan", mode="unmerge", max_fraction=0.5)
    """
    state = host_state()
    if state is None:
        return
    options = Options(mask, force, max_fraction, tuple(vmids or ()))
    host_plan = planner.plan(state, Mode(mode), options)
    if host_plan.refusal is not None:
        yield refusal_command(host_plan.refusal.reason)
        return
    host.noop(f"{mode} plan: {len(host_plan.steps)} change(s), nothing refused")


@operation()
def audited(
    max_fraction: float = DEFAULT_MAX_FRACTION, policy: str = "host"
) -> Generator[Any, None, None]:
    """
    Report the host's KSM verdict; changes nothing.

    + max_fraction: the unmerge memory limit to judge the host against
    + policy: ``host`` (KSM off host-wide) or ``strict`` (every VM opted out too)

    .. code:: python

        ksm.audited(name="Audit KSM")
    """
    state = host_state()
    if state is None:
        return
    record = audit_record(state, Options(max_fraction=max_fraction, policy=Policy(policy)))
    logger.info(f"{host.print_prefix}KSM {audit_line(record)}")
    host.noop(f"KSM verdict is {record['verdict']}")
    yield from ()
