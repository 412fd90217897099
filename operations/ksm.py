"""Operations that switch KSM off (and back on) on a host: units, ``run``, boot persistence."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand, operation
from pyinfra.context import ctx_host

from .facts import KSM_DIR, PERSIST_LINE, PERSIST_PATH, RUN_PATH, UNITS, KsmHost
from .report import (
    DEFAULT_MAX_FRACTION,
    audit_line,
    audit_record,
    human_bytes,
    merged_page_count,
    unit_active,
    unit_enabled,
    unit_label,
    unit_present,
    unmerge_allowed_bytes,
    unmerge_need_bytes,
)

# The first word of the line the unmerge script prints when it is done.
UNMERGE_MARK = "ksm-guard-unmerged"

# The unmerge runs detached from the SSH session: a dropped connection (SIGHUP) must not
# interrupt the synchronous write, and the counters prove the result afterwards.
UNMERGE_SCRIPT = f"""\
f="$1"
if [ "$(cat "$f/run")" = 2 ]; then echo 0 > "$f/run" || exit 1; fi
pages=$(( $(cat "$f/pages_sharing") + $(cat "$f/ksm_zero_pages" 2>/dev/null || echo 0) ))
start=$(date +%s%N)
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
  systemd-run --quiet --wait --collect --service-type=oneshot \
    --description='ksm-guard unmerge' sh -c 'echo 2 > "$1"' ksm-guard-unmerge "$f/run"
else
  setsid -w sh -c 'trap "" HUP; echo 2 > "$1"' ksm-guard-unmerge "$f/run" </dev/null
fi
rc=$?
ms=$(( ($(date +%s%N) - start) / 1000000 ))
shared=$(cat "$f/pages_shared"); sharing=$(cat "$f/pages_sharing")
if [ "$shared" != 0 ] || [ "$sharing" != 0 ]; then
  echo "unmerge incomplete: pages_shared=$shared pages_sharing=$sharing remain" \
    "(writer exit $rc); run unmerge again" >&2
  exit 1
fi
echo "{UNMERGE_MARK} pages=$pages page_size=$(getconf PAGESIZE) ms=$ms"
"""


def log_change(text: str) -> None:
    """Log one from-to line of an operation's diff, so that dry runs show it."""
    logger.info(
        f"{host.print_prefix}{text}",
        extra={
            "ksm_guard_host": host.name,
            "ksm_guard_change": text,
            "ksm_guard_executing": host.state.is_executing,
        },
    )


def refuse(state: Any, host: Any, message: str) -> bool:
    """Fail this host with ``message`` without running anything on it."""
    logger.error(
        f"{host.print_prefix}{message}",
        extra={"ksm_guard_host": host.name, "ksm_guard_refusal": message},
    )
    return False


def refusal_command(message: str) -> FunctionCommand:
    """A command that fails the host with ``message`` and runs nothing on it."""
    return FunctionCommand(refuse, (message,), {})


def needs_root(fact: dict[str, Any]) -> FunctionCommand | None:
    if fact["uid"] == 0:
        return None
    return refusal_command(
        f"permission denied: connected as uid {fact['uid']}; changing KSM needs root "
        "(use --sudo or _sudo=True)"
    )


# pyinfra does not cache facts. While a run is being prepared nothing changes on the host, so
# the operations of one mode share a single read; while executing, every operation reads afresh.
_prepared: WeakKeyDictionary[Any, dict[str, Any]] = WeakKeyDictionary()


def host_state() -> dict[str, Any] | None:
    """The KsmHost fact, or None (after a noop) when it could not be read: the host has failed."""
    current = ctx_host.get()  # the Host itself: the ``host`` proxy hashes as whichever is current
    preparing = not host.state.is_executing
    if preparing and current in _prepared:
        return _prepared[current]
    fact = host.get_fact(KsmHost)
    if fact is None:
        host.noop("KSM state could not be read")
    elif preparing:
        _prepared[current] = fact
    return fact


UnitPlan = Callable[[dict[str, str]], tuple[list[str], str]]


def _drive_units(
    fact: dict[str, Any], order: tuple[str, ...], plan: UnitPlan, settled: str
) -> Generator[Any, None, None]:
    """Run ``plan`` over the installed units: log each diff, then yield systemctl commands."""
    commands: list[StringCommand] = []
    for name in order:
        unit = fact["units"].get(name)
        if unit is None or not unit_present(unit):
            continue
        actions, after = plan(unit)
        if actions:
            log_change(f"{name}: {unit_label(unit)} → {after}")
            commands.extend(StringCommand("systemctl", a, QuoteString(name)) for a in actions)

    if not commands:
        states = ", ".join(f"{name} {unit_label(fact['units'].get(name))}" for name in UNITS)
        host.noop(f"{settled}: {states}")
        return
    refusal = needs_root(fact)
    yield from [refusal] if refusal else commands


@operation()
def services_disabled(mask: bool = False) -> Generator[Any, None, None]:
    """
    Stop and disable ``ksmtuned.service`` and ``ksm.service`` wherever they are installed.

    + mask: also mask both units, so that a package reinstall cannot bring them back

    .. code:: python

        ksm.services_disabled(name="Switch off ksmtuned and ksm.service", mask=True)
    """
    fact = host_state()
    if fact is None:
        return
    if not fact["systemd"]:
        host.noop("systemd is not running: no KSM units to switch off")
        return

    def plan(unit: dict[str, str]) -> tuple[list[str], str]:
        actions = [
            *(["stop"] if unit_active(unit) else []),
            *(["disable"] if unit_enabled(unit) else []),
            *(["mask"] if mask and unit["unit_file"] != "masked" else []),
        ]
        after_file = "masked" if mask else ("disabled" if unit_enabled(unit) else unit["unit_file"])
        after_active = "inactive" if unit_active(unit) else unit["active"]
        return actions, f"{after_file}/{after_active}"

    yield from _drive_units(fact, UNITS, plan, "KSM units are off")


@operation()
def merging_stopped() -> Generator[Any, None, None]:
    """
    Stop ksmd merging pages: write ``run=0`` when ``run`` reads 1 (merged pages stay merged).

    .. code:: python

        ksm.merging_stopped(name="Stop KSM merging")
    """
    fact = host_state()
    if fact is None:
        return
    ksm = fact["ksm"]
    if ksm is None:
        host.noop(f"kernel has no KSM ({KSM_DIR} is absent)")
        return
    if ksm["run"] != 1:
        host.noop(f"KSM merging is stopped (run={ksm['run']})")
        return

    log_change("run: 1 → 0")
    refusal = needs_root(fact)
    if refusal:
        yield refusal
        return
    yield StringCommand("echo", QuoteString("0"), ">", QuoteString(RUN_PATH))


@operation()
def boot_persisted(present: bool = True) -> Generator[Any, None, None]:
    """
    Keep ``run=0`` across reboots with a systemd-tmpfiles entry, or remove that entry.

    + present: whether the entry should exist

    .. code:: python

        ksm.boot_persisted(name="Keep KSM off at boot", present=True)
    """
    fact = host_state()
    if fact is None:
        return
    if not fact["systemd"]:
        host.noop("systemd is not running: boot persistence is not managed")
        return
    if present and fact["ksm"] is None:
        host.noop(f"kernel has no KSM ({KSM_DIR} is absent): nothing to persist")
        return
    wanted = "present" if present else "absent"
    if fact["persist"] == wanted:
        host.noop(f"boot persistence file {PERSIST_PATH} is {wanted}")
        return

    log_change(f"{PERSIST_PATH}: {fact['persist']} → {wanted}")
    refusal = needs_root(fact)
    if refusal:
        yield refusal
        return
    if present:
        yield StringCommand("mkdir", "-p", QuoteString("/etc/tmpfiles.d"))
        line, path = QuoteString(PERSIST_LINE), QuoteString(PERSIST_PATH)
        yield StringCommand("printf", QuoteString("%s\\n"), line, ">", path)
    else:
        yield StringCommand("rm", "-f", QuoteString(PERSIST_PATH))


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
    fact = host_state()
    if fact is None:
        return
    ksm = fact["ksm"]
    if ksm is None:
        host.noop(f"kernel has no KSM ({KSM_DIR} is absent)")
        return
    if not merged_page_count(ksm):
        host.noop(f"no merged pages (pages_shared=0, pages_sharing=0, run={ksm['run']})")
        return

    need = unmerge_need_bytes(fact)
    available = fact["mem_available"]
    allowed = unmerge_allowed_bytes(fact, max_fraction)
    log_change(
        f"pages_sharing: {ksm.get('pages_sharing', 0)} → 0 "
        f"(~{human_bytes(need)} to unmerge, {human_bytes(available)} available)"
    )
    refusal = needs_root(fact)
    if refusal:
        yield refusal
        return
    if need > allowed and not force:
        yield refusal_command(
            f"unsafe unmerge refused: needs {human_bytes(need)} ({need} bytes), more than "
            f"{max_fraction * 100:g}% of MemAvailable {human_bytes(available)} "
            f"({available} bytes); free memory, raise the limit (--max-fraction) or force it "
            "(--force)"
        )
        return
    yield StringCommand("sh", "-c", QuoteString(UNMERGE_SCRIPT), "ksm-guard", QuoteString(KSM_DIR))


@operation()
def services_enabled() -> Generator[Any, None, None]:
    """
    Roll back: unmask, enable and start ``ksm.service`` and ``ksmtuned.service`` where installed.

    .. code:: python

        ksm.services_enabled(name="Switch ksmtuned back on")
    """
    fact = host_state()
    if fact is None:
        return
    if not fact["systemd"]:
        host.noop("systemd is not running: no KSM units to switch on")
        return

    def plan(unit: dict[str, str]) -> tuple[list[str], str]:
        masked = unit["unit_file"] == "masked"
        actions = [
            *(["unmask"] if masked else []),
            *(["enable"] if masked or not unit_enabled(unit) else []),
            *(["start"] if not unit_active(unit) else []),
        ]
        return actions, "enabled/active"

    # ksmtuned requires ksm.service on Debian: bring that one up first.
    yield from _drive_units(fact, UNITS[::-1], plan, "KSM units are on or not installed")


@operation()
def rejected(reason: str) -> Generator[Any, None, None]:
    """
    Fail the host without touching it: its ksm-guard settings are wrong.

    + reason: what is wrong, shown as the host's error

    .. code:: python

        ksm.rejected(name="Check ksm-guard settings", reason="unknown ksm_mode 'disabel'")
    """
    yield refusal_command(reason)


@operation()
def audited(max_fraction: float = DEFAULT_MAX_FRACTION) -> Generator[Any, None, None]:
    """
    Report the host's KSM verdict; changes nothing.

    + max_fraction: the unmerge memory limit to judge the host against

    .. code:: python

        ksm.audited(name="Audit KSM")
    """
    fact = host_state()
    if fact is None:
        return
    record = audit_record(fact, max_fraction)
    logger.info(f"{host.print_prefix}KSM {audit_line(record)}")
    host.noop(f"KSM verdict is {record['verdict']}")
    yield from ()
