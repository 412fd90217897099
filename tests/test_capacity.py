"""
The capacity plan against fleet fixtures (tests/capacity/<case>.yaml, one scenario a file), and
its promise that a host it calls safe is one ``unmerge`` does not refuse.

A case is a saved ``ksm-guard audit -o json`` document (``hosts[].host``, ``hosts[].audit``;
byte counts may be written ``12 GiB``), optional ``options`` (``min_headroom``,
``max_fraction``) and ``expected``: the parts of the ``plan -o json`` document that matter to the
scenario (``hosts`` by name, each a subset of its ``capacity``; ``moves`` in order, each a subset;
``n_plus_1`` a subset).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from ksm_guard.cli.capacity import exit_code
from ksm_guard.cli.capacity_render import as_json
from ksm_guard.operations.capacity import (
    CapacityInputError,
    CapacityPlan,
    HostInput,
    Outcome,
    hosts_from_document,
    node_name,
    plan_capacity,
)
from ksm_guard.operations.model import HostState, Mode, Options
from ksm_guard.operations.plan import RefusalCode, plan
from ksm_guard.operations.report import audit_record

CASES = sorted((Path(__file__).parent / "capacity").glob("*.yaml"))
FACTS = sorted((Path(__file__).parent / "facts" / "facts.KsmHost").glob("*.yaml"))
_SIZE = re.compile(r"(-?\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def sizes(value: Any) -> Any:
    """``value`` with every ``12 GiB`` string turned into its byte count."""
    if isinstance(value, dict):
        return {key: sizes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [sizes(item) for item in value]
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else value


def load_case(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The case's audit document, its options and what it expects."""
    case = sizes(yaml.safe_load(path.read_text()))
    expected, options = case.pop("expected"), case.pop("options", {})
    return case, options, expected


def planned(path: Path) -> tuple[CapacityPlan, dict[str, Any], dict[str, Any]]:
    """The case planned, its ``plan -o json`` document, and what it expects."""
    document, options, expected = load_case(path)
    capacity = plan_capacity(hosts_from_document(document), **options)
    return capacity, json.loads(as_json(capacity, exit_code(capacity))), expected


def assert_subset(actual: Any, wanted: Any, where: str = "") -> None:
    """Every key ``wanted`` names has that value in ``actual`` (dicts compared key by key)."""
    if isinstance(wanted, dict) and isinstance(actual, dict):
        for key, value in wanted.items():
            assert key in actual, f"{where}.{key} missing"
            assert_subset(actual[key], value, f"{where}.{key}")
    else:
        assert actual == wanted, f"{where}: {actual!r} != {wanted!r}"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_plan(path: Path) -> None:
    """The exit code, outcome, summary, per-host figures and moves the case expects."""
    _, document, expected = planned(path)
    hosts = {host["host"]: host for host in document["hosts"]}
    assert document["exit_code"] == expected["exit_code"]
    assert document["outcome"] == expected["outcome"]
    assert_subset(document, {"min_headroom": expected.get("min_headroom", 0.1)})
    for key in ("feasible", "shortfall_bytes", "search"):
        assert_subset(document, {key: expected[key]} if key in expected else {})
    assert_subset(document["summary"], expected.get("summary", {}), "summary")
    for name, wanted in expected["hosts"].items():
        if wanted is None:
            assert hosts[name]["capacity"] is None and hosts[name]["detail"]
        else:
            assert_subset(hosts[name]["capacity"], wanted, name)
    if "n_plus_1" in expected and expected["n_plus_1"] is None:
        assert document["n_plus_1"] is None  # several pools: each has its own
    else:
        assert_subset(document["n_plus_1"], expected.get("n_plus_1", {}), "n_plus_1")
    if "pools" in expected:
        pools = zip(document["pools"], expected["pools"], strict=True)
        for number, (pool, wanted) in enumerate(pools):
            assert_subset(pool, wanted, f"pools[{number}]")
    assert len(document["moves"]) == len(expected["moves"])
    for number, (move, wanted) in enumerate(zip(document["moves"], expected["moves"], strict=True)):
        assert_subset(move, wanted, f"moves[{number}]")


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_the_issue_fields_agree_with_the_figures(path: Path) -> None:
    """
    ``feasible``, ``shortfall_bytes`` (0 when feasible, else the RAM missing), and per host
    ``safe_now`` and ``headroom_after_bytes`` (what is left after the moves and the unmerge).
    """
    _, document, _ = planned(path)
    feasible = document["outcome"] != "impossible"
    assert document["feasible"] is feasible
    assert document["shortfall_bytes"] == (0 if feasible else document["summary"]["missing_bytes"])
    for host in document["hosts"]:
        capacity = host["capacity"]
        if capacity is None:
            assert host["safe_now"] is host["headroom_after_bytes"] is None
            continue
        assert host["safe_now"] is capacity["safe"]
        assert host["safe_after"] is capacity["after_moves"]["safe"]
        after = capacity["after_moves"]["available_after_unmerge_bytes"]
        assert host["headroom_after_bytes"] == after


def state_of(audit: dict[str, Any]) -> HostState:
    """The host state an audit record was made from, as far as unmerge's preflight reads it."""
    need_pages = audit["unmerge_need_bytes"] // audit["page_size"]
    zero = min(audit.get("ksm_zero_pages", 0), need_pages)
    return cast(
        HostState,
        {
            "uid": 0, "page_size": audit["page_size"], "mem_total": audit["mem_total_bytes"],
            "mem_available": audit["mem_available_bytes"], "systemd": False, "units": {},
            "ksm": {"run": 1, "pages_shared": audit["pages_shared"],
                    "pages_sharing": need_pages - zero, "ksm_zero_pages": zero},
            "persist": "absent", "qemu_server": None, "vms": [], "pve_configs": {},
        },
    )  # fmt: skip


def refused_as_unsafe(state: HostState, max_fraction: float) -> bool:
    """``unmerge`` with this fraction refuses the host as an unsafe unmerge."""
    refusal = plan(state, Mode.UNMERGE, Options(max_fraction=max_fraction)).refusal
    return refusal is not None and refusal.code is RefusalCode.UNSAFE_UNMERGE


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_unmerge_refuses_exactly_the_hosts_whose_preflight_fails(path: Path) -> None:
    """Per host as it is: unmerge's own plan refuses it as unsafe iff the capacity plan says so."""
    capacity, _, _ = planned(path)
    for host in capacity.hosts:
        document, _, _ = load_case(path)
        audit = next(h["audit"] for h in document["hosts"] if h["host"] == host.host)
        preflight = any(reason.startswith("unmerge refused") for reason in host.reasons_now)
        assert refused_as_unsafe(state_of(audit), host.load.max_fraction) == preflight, host.host


def assert_moves_only_shift_memory(capacity: CapacityPlan) -> None:
    """
    What is left after the unmerge, summed over the fleet, is the same with and without the
    moves; targets were safe before and stay safe; a host never takes in and sends off both;
    a VM moves once, off its own host; every host is safe after the moves unless impossible.
    """
    assert sum(h.after.left for h in capacity.hosts) == sum(h.now.left for h in capacity.hosts)
    sources = {move.source for move in capacity.moves}
    by_name = {host.host: host for host in capacity.hosts}
    for move in capacity.moves:
        assert move.target not in sources
        assert by_name[move.target].safe_now and by_name[move.target].safe_after
        assert move.vm in by_name[move.source].load.vms
    moved = [(move.source, move.vm.pid) for move in capacity.moves]
    assert len(moved) == len(set(moved))
    unsafe = [host for host in capacity.hosts if not host.safe_after]
    assert bool(unsafe) == (capacity.outcome is Outcome.IMPOSSIBLE)
    assert all(host.missing is None or host.missing > 0 for host in unsafe)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_moves_only_shift_memory(path: Path) -> None:
    """The fixtures' moves keep the fleet's memory and leave targets safe."""
    assert_moves_only_shift_memory(planned(path)[0])


def _random_fleet(rng: random.Random) -> list[HostInput]:
    gib = 1 << 30
    hosts = []
    for number in range(rng.randrange(1, 12)):
        total = rng.choice([32, 64, 128, 256]) * gib
        vms = [
            {"pid": pid, "vmid": str(100 + pid), "name": None,
             "merged_bytes": rng.randrange(0, 4 * gib, 4096),
             "ksm_zero_pages": rng.choice([None, 0, rng.randrange(0, 1 << 18)]),
             "rss_bytes": rng.choice([None, rng.randrange(gib // 2, 32 * gib, 4096)]),
             "configured_bytes": rng.choice([None, rng.randrange(1, 32) * gib])}
            for pid in range(rng.randrange(0, 12))
        ]  # fmt: skip
        audit = {
            "mem_total_bytes": total, "page_size": 4096,
            "mem_available_bytes": rng.randrange(0, total, 4096),
            "unmerge_need_bytes": rng.randrange(0, total // 2, 4096),
            "pages_shared": rng.randrange(0, 1 << 20),
            "unmerge_max_fraction": rng.choice([0.5, 0.9, 0.25]), "vms": vms,
        }  # fmt: skip
        hosts.append(HostInput(f"h{number}", cast(dict[str, object], audit)))
    return hosts


@pytest.mark.parametrize("seed", range(40))
def test_random_fleets_keep_the_promises(seed: int) -> None:
    """Random fleets: the moves only shift memory, and targets end safe."""
    rng = random.Random(seed)
    assert_moves_only_shift_memory(plan_capacity(_random_fleet(rng), rng.choice([0, 0.1, 0.2])))


def _random_state(rng: random.Random, base: HostState) -> tuple[HostState, float]:
    """A host state near the preflight's edge: need, MemAvailable and fraction drawn at random."""
    page = base["page_size"]
    total = rng.randrange(1 << 18, 1 << 22) * page
    available = rng.randrange(0, total // page) * page + rng.randrange(0, page)
    fraction = rng.choice([0.5, 1.0, 0.3, 0.01, rng.uniform(0.001, 1.0)])
    edge = int(available * fraction) // page
    sharing = max(0, edge + rng.choice([-1, 0, 0, 1, rng.randrange(-edge - 1, edge + 2)]))
    zero = rng.randrange(0, sharing + 1) if rng.random() < 0.3 else 0
    state = cast(HostState, dict(base))
    state["mem_total"], state["mem_available"], state["uid"] = total, available, 0
    state["ksm"] = {**(base["ksm"] or {"run": 1}), "pages_sharing": sharing - zero,
                    "pages_shared": rng.randrange(0, 1000), "ksm_zero_pages": zero}  # fmt: skip
    return state, fraction


@pytest.mark.parametrize("fact", FACTS, ids=lambda p: p.stem)
def test_a_host_called_safe_is_never_refused_by_unmerge(fact: Path) -> None:
    """
    Captured host states with random memory around the preflight's edge: every host the plan
    calls safe without moves passes unmerge's plan, and every host it says unmerge refuses is.
    """
    base = cast(HostState, yaml.safe_load(fact.read_text())["fact"])
    rng = random.Random(fact.stem)
    for _ in range(200):
        state, fraction = _random_state(rng, base)
        record = cast(dict[str, object], audit_record(state, Options(max_fraction=fraction)))
        capacity = plan_capacity([HostInput("h", record)], min_headroom=rng.choice([0, 0.1]))
        host = capacity.hosts[0]
        if host.safe_now:
            assert not refused_as_unsafe(state, fraction)
        preflight = any(reason.startswith("unmerge refused") for reason in host.reasons_now)
        assert refused_as_unsafe(state, fraction) == preflight


@pytest.mark.parametrize(
    ("audit", "node"),
    [({}, None), ({"evidence": None}, None), ({"evidence": "pve-a"}, None),
     ({"evidence": {}}, None), ({"evidence": {"hostname": ""}}, None),
     ({"evidence": {"hostname": ["pve-a"]}}, None), ({"evidence": {"hostname": "pve-a"}}, "pve-a"),
     ({"evidence": {"hostname": " pve-a.example.org\n"}}, "pve-a")],
)  # fmt: skip
def test_the_node_name_is_the_short_hostname_when_the_audit_has_one(
    audit: dict[str, object], node: str | None
) -> None:
    """evidence.hostname up to the first dot; anything else is no node name (never an error)."""
    assert node_name(audit) == node


BAD_DOCUMENTS = {
    "not an object": ([], "no hosts list"),
    "no hosts": ({"hosts": []}, "no hosts list"),
    "host without a name": ({"hosts": [{"audit": None}]}, "hosts[0] must be an object"),
    "twice": (
        {"hosts": [{"host": "a", "audit": None}, {"host": "a", "audit": None}]},
        "hosts[1]: host 'a' is listed twice",
    ),
    "audit not an object": ({"hosts": [{"host": "a", "audit": 3}]}, "audit must be an object"),
    "missing field": (
        {"hosts": [{"host": "a", "audit": {"mem_total_bytes": 1}}]},
        "hosts[0] (a).audit.page_size must be a non-negative integer, not None",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_a_bad_document_is_one_line_naming_the_field(case: str) -> None:
    """What cannot be planned from is refused with the host and field named."""
    document, message = BAD_DOCUMENTS[case]
    with pytest.raises(CapacityInputError, match=re.escape(message)):
        hosts_from_document(document)


@pytest.mark.parametrize(
    ("field", "value"),
    [("unmerge_max_fraction", 0), ("unmerge_max_fraction", True), ("mem_available_bytes", -1),
     ("vms", {}), ("mem_total_bytes", 0)],
)  # fmt: skip
def test_a_bad_audit_field_is_refused(field: str, value: object) -> None:
    """Fractions outside (0, 1], negative or boolean byte counts, a vms that is no list."""
    document, _, _ = load_case(CASES[0])
    document["hosts"][0]["audit"][field] = value
    with pytest.raises(CapacityInputError, match=field):
        hosts_from_document(document)
