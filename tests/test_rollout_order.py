"""
``unmerge --order plan``: the rollout takes first the hosts the capacity plan calls safe as they
are, then the rest, inventory order within each; the ordering function, the batches, and a dry
run over a loopback fleet whose hosts read different memory.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.cli.capacity import plan_order
from ksm_guard.cli.engine import (
    ORDER_INVENTORY,
    ORDER_PLAN,
    HostResult,
    Reading,
    Request,
    RunResult,
    _batches,
)
from ksm_guard.operations.capacity import HostInput, safe_first
from ksm_guard.operations.model import Mode, Status
from ksm_guard.operations.plan import Refusal, RefusalCode
from tests.localssh import LocalSshd, inventory_source
from tests.results import hosts_of

GIB = 1 << 30
runner = CliRunner()


def audit(
    available: float, need: float, total: float = 64, fraction: float = 0.5
) -> dict[str, Any]:
    """An audit record as far as the capacity plan reads it (sizes in GiB)."""
    return {
        "mem_total_bytes": int(total * GIB), "mem_available_bytes": int(available * GIB),
        "unmerge_need_bytes": int(need * GIB), "pages_shared": 0, "page_size": 4096,
        "unmerge_max_fraction": fraction, "vms": [],
    }  # fmt: skip


# name: (audit, blocked); unsafe: preflight, headroom, settings, no audit, an unreadable audit
HOSTS: dict[str, tuple[dict[str, Any] | None, str | None]] = {
    "refused": (audit(available=8, need=6), None),
    "safe1": (audit(available=40, need=4), None),
    "thin": (audit(available=7, need=1), None),
    "safe2": (audit(available=30, need=0), None),
    "blocked": (audit(available=40, need=1), "ksm_max_fraction must be a number in (0, 1]"),
    "unread": (None, None),
    "odd": ({"mem_total_bytes": "lots"}, None),
}


def test_safe_first_puts_the_hosts_needing_no_move_first() -> None:
    """Safe hosts first, then the rest, each group in the order given."""
    hosts = [HostInput(name, audit, blocked=blocked) for name, (audit, blocked) in HOSTS.items()]
    assert safe_first(hosts) == ["safe1", "safe2", "refused", "thin", "blocked", "unread", "odd"]
    assert safe_first(hosts, min_headroom=0) == [
        "safe1", "thin", "safe2", "refused", "blocked", "unread", "odd",
    ]  # fmt: skip


def _result(statuses: dict[str, Status]) -> RunResult:
    """A dry run's result over HOSTS (those with a readable audit), with these statuses."""
    hosts = []
    for name, status in statuses.items():
        record, blocked = HOSTS[name]
        refusal = Refusal(RefusalCode.BAD_SETTINGS, blocked) if blocked else None
        hosts.append(HostResult(name, status, audit=cast(Any, record), refusal=refusal))
    return RunResult(Mode.UNMERGE, True, hosts)


STATUSES = {
    "refused": Status.REFUSED,
    "safe1": Status.WOULD_CHANGE,
    "thin": Status.WOULD_CHANGE,
    "safe2": Status.WOULD_CHANGE,
    "blocked": Status.REFUSED,
}


def test_plan_order_reads_safety_from_the_run_audits() -> None:
    """The run's audits and bad-settings refusals decide; the names' order within a group."""
    result = _result(STATUSES)
    names = list(STATUSES)
    assert plan_order(result, names) == ["safe1", "safe2", "refused", "thin", "blocked"]


@pytest.mark.parametrize(
    ("order", "batch", "batches"),
    [
        (ORDER_INVENTORY, 1, [["refused"], ["safe1"], ["thin"], ["safe2"], ["blocked"]]),
        (ORDER_PLAN, 1, [["safe1"], ["safe2"], ["refused"], ["thin"], ["blocked"]]),
        (ORDER_PLAN, 2, [["safe1", "safe2"], ["refused", "thin"], ["blocked"]]),
        (ORDER_PLAN, 0, [["safe1", "safe2", "refused", "thin", "blocked"]]),
    ],
)
def test_the_batches_follow_the_order(order: str, batch: int, batches: list[list[str]]) -> None:
    """Hosts with nothing to change stay out of every batch, whatever the order."""
    result = _result({**STATUSES, "odd": Status.OK})
    request = Request(Mode.UNMERGE, batch=batch, order=order)
    assert _batches(request, result) == batches


# -- a dry run over a loopback fleet ----------------------------------------------------------

# Each name reads this machine with its memory and merged pages replaced (in GiB): node1's
# unmerge is refused, node3's passes its preflight but would leave under 10% of RAM; node2 and
# node4 are safe.
MEMORY = {"node1": (2.0, 1.5), "node2": (None, 0.5), "node3": (None, 0.1), "node4": (None, 0.5)}


@pytest.fixture
def fleet_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host's read, with MEMORY's MemAvailable (None: 90% of RAM; node3: 2%) and need."""
    from ksm_guard.cli import engine

    reading = engine.read_host

    def read_host(state: Any, host: Any) -> Reading:
        read = reading(state, host)
        assert read.state is not None, read.error
        available, need = MEMORY[host.name]
        total = read.state["mem_total"]
        share = 0.02 if host.name == "node3" else 0.9
        read.state["mem_available"] = int(available * GIB) if available else int(total * share)
        pages = int(need * GIB) // read.state["page_size"]
        read.state["ksm"] = {
            **(read.state["ksm"] or {}), "run": 1, "pages_shared": pages // 4,
            "pages_sharing": pages, "ksm_zero_pages": 0,
        }  # fmt: skip
        return read

    monkeypatch.setattr(engine, "read_host", read_host)


@pytest.mark.parametrize(
    ("order", "statuses"),
    [
        ([], ["refused", "not-reached", "not-reached", "not-reached"]),
        (["--order", "inventory"], ["refused", "not-reached", "not-reached", "not-reached"]),
        (["--order", "plan"], ["refused", "would-change", "not-reached", "would-change"]),
    ],
)
@pytest.mark.usefixtures("fleet_memory")
def test_a_dry_run_rolls_out_in_plan_order(
    local_sshd: LocalSshd, write_inventory, order: list[str], statuses: list[str]
) -> None:
    """
    unmerge --dry-run, one host a batch: in inventory order node1's refusal stops the rollout
    at once; with --order plan node2 and node4 go first, then node1 stops it before node3.
    """
    inventory = write_inventory(inventory_source([local_sshd.host(name) for name in MEMORY]))
    result = runner.invoke(app, ["unmerge", "--dry-run", "-i", inventory, "-o", "json", *order])
    hosts = hosts_of(result)
    assert result.exit_code == 1, result.output
    assert [host["status"] for host in hosts.values()] == statuses
    assert hosts["node1"]["refusal"]["code"] == "unsafe-unmerge"
    if "plan" in order:
        assert hosts["node3"]["detail"] == "rollout stopped at node1"
