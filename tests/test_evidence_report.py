"""
``ksm-guard report``: the evidence bundle of a loopback fleet, read back as its users would read
it: JSON and JUnit parsed, ``sha256sum -c`` run, the page rendered by a real headless Chromium.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bench.netutil import free_port
from ksm_guard.cli.app import app
from ksm_guard.cli.evidence import CONTROLS, raw_names
from ksm_guard.operations.facts import KSM_HOST_COMMAND, parse_ksm_host
from ksm_guard.operations.model import Policy, Verdict
from tests.conftest import BIN
from tests.dnsjail import run_jailed, unavailable
from tests.localksm import locked
from tests.localssh import LocalSshd, inventory_source, ssh_data
from tests.pngread import colour_census
from tests.test_fleet import on_the_wire

__all__ = ["on_the_wire"]  # a fixture: imported to be used here (merged_pages is in conftest)

runner = CliRunner()
ODD = "<b>odd & 'quoted'</b>"  # a host name that HTML must escape
ESCAPING = "../../etc/passwd"  # a host name that must not leave raw/
LIVE = ["node1", ODD, ESCAPING]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CONTROL_IDS = ["KSM-1", "KSM-2", "KSM-3", "KSM-4", "KSM-5", "KSM-6"]


@dataclass
class Bundle:
    out: Path
    inventory: Path
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str

    def text(self, name: str) -> str:
        return (self.out / name).read_text()

    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.text("report.json"))
        return document

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {host["host"]: host for host in self.json()["hosts"]}


@pytest.fixture(scope="module")
def bundle(local_sshd: LocalSshd, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """One report of three live names of this machine and a closed port, written once."""
    work = tmp_path_factory.mktemp("report")
    hosts = [local_sshd.host(name) for name in LIVE]
    hosts.append(("dead", ssh_data(free_port(), local_sshd.key)))
    inventory = work / "fleet.py"
    inventory.write_text(inventory_source(hosts))
    out = work / "evidence"
    argv = ["report", "-i", str(inventory), "--out", str(out), "--connect-timeout", "3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ksm-guard", *argv])
        result = runner.invoke(app, argv)
    return Bundle(out, inventory, ["ksm-guard", *argv], result.exit_code, result.stdout,
                  result.stderr)  # fmt: skip


def test_the_bundle_holds_every_file_and_sums_them(bundle: Bundle) -> None:
    """report.html, .json, .junit.xml, one raw file per reached host, and SHA256SUMS of all."""
    found = sorted(str(p.relative_to(bundle.out)) for p in bundle.out.rglob("*") if p.is_file())
    raws = sorted(raw_names(LIVE).values())
    assert found == sorted(["SHA256SUMS", "report.html", "report.json", "report.junit.xml", *raws])
    summed = [line.split("  ", 1)[1] for line in bundle.text("SHA256SUMS").splitlines()]
    assert sorted(summed) == sorted(set(found) - {"SHA256SUMS"})


def test_sha256sum_checks_the_bundle(bundle: Bundle) -> None:
    """``sha256sum -c SHA256SUMS`` in the directory: every file OK, exit 0."""
    done = subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"],
        cwd=bundle.out, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK") == len(bundle.text("SHA256SUMS").splitlines())


def test_sha256sum_catches_an_altered_file(bundle: Bundle, tmp_path: Path) -> None:
    """The page edited in a copy of the bundle: sha256sum -c fails, naming the file."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle.out, copy)
    page = copy / "report.html"
    text = page.read_text()
    edited = text.replace("exit code <b>3</b>", "exit code <b>0</b>")
    assert edited != text
    page.write_text(edited)
    done = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "report.html: FAILED" in done.stdout


def test_exit_code_is_the_audits(bundle: Bundle) -> None:
    """A closed port: exit 3, as audit; the dead host is reported, the others are in the bundle."""
    assert bundle.exit_code == 3, bundle.stderr
    assert "ksm-guard: dead: unreachable:" in bundle.stderr
    assert f"cd {bundle.out} && sha256sum -c SHA256SUMS" in bundle.stderr


def test_json_is_the_audit_document_plus_evidence(bundle: Bundle) -> None:
    """
    schema_version 1, every field audit -o json has, then the evidence fields. (The two runs'
    verdicts are not compared: another session's real-KSM test may switch KSM on between them.)
    """
    audit = runner.invoke(app, ["audit", "-i", str(bundle.inventory), "-o", "json",
                                "--connect-timeout", "3"])  # fmt: skip
    expected = json.loads(audit.stdout)
    document = bundle.json()
    assert document["schema_version"] == 1
    assert set(document) == set(expected) | {"report", "capacity"}
    assert document["exit_code"] == expected["exit_code"] == bundle.exit_code
    assert [h["host"] for h in document["hosts"]] == [h["host"] for h in expected["hosts"]]
    for mine, theirs in zip(document["hosts"], expected["hosts"], strict=True):
        assert set(mine) == set(theirs) | {"evidence", "raw_output", "controls"}
        assert (mine["audit"] is None) == (theirs["audit"] is None)
        if mine["audit"] is not None:
            assert set(mine["audit"]) == set(theirs["audit"])
            assert mine["verdict"] == mine["audit"]["verdict"]


def test_the_capacity_plan_is_plans_on_the_same_reads(bundle: Bundle) -> None:
    """report.json's ``capacity`` is what ``plan --from report.json -o json`` says of it."""
    planned = runner.invoke(app, ["plan", "--from", str(bundle.out / "report.json"), "-o", "json"])
    assert planned.exit_code in (0, 1, 3), planned.stderr
    assert bundle.json()["capacity"] == json.loads(planned.stdout)
    assert [h["host"] for h in bundle.json()["capacity"]["hosts"]] == list(bundle.hosts())


def test_json_evidence_is_this_machines(bundle: Bundle) -> None:
    """Each reached name answered as this machine: its hostname, kernel and boot id."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    hosts = bundle.hosts()
    for name in LIVE:
        evidence = hosts[name]["evidence"]
        assert evidence["hostname"] == os.uname().nodename
        assert evidence["kernel"] == os.uname().release
        assert evidence["boot_id"] == boot_id
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", evidence["time"])
    assert hosts["dead"]["evidence"] is None and hosts["dead"]["raw_output"] is None


def test_json_says_who_ran_the_report_and_on_what(bundle: Bundle) -> None:
    """Version, command line, controller user and hostname, the inventory file's SHA-256."""
    from ksm_guard import __version__

    meta = bundle.json()["report"]
    assert meta["ksm_guard_version"] == __version__
    assert meta["command_line"] == shlex.join(bundle.argv)
    assert meta["controller"]["hostname"] == os.uname().nodename
    assert meta["controller"]["user"]
    assert meta["inventory"] == {
        "spec": str(bundle.inventory),
        "sha256": hashlib.sha256(bundle.inventory.read_bytes()).hexdigest(),
    }
    assert [c["id"] for c in meta["controls"]] == CONTROL_IDS


def test_raw_files_are_the_fact_commands_output(bundle: Bundle) -> None:
    """Each raw file parses as the one fact command's answer; the JSON gives its path and digest."""
    for name, host in bundle.hosts().items():
        if name == "dead":
            continue
        raw = bundle.out / host["raw_output"]["path"]
        assert raw.parent == bundle.out / "raw"
        assert hashlib.sha256(raw.read_bytes()).hexdigest() == host["raw_output"]["sha256"]
        state = parse_ksm_host(raw.read_text().splitlines())
        assert state["evidence"] == host["evidence"]
        assert raw.read_text().startswith("## meta\n")


def test_raw_file_names_are_safe_and_distinct() -> None:
    """Only letters, digits, . _ - and ~; no leading dot; clashes (ignoring case) numbered."""
    names = raw_names(["@local", "../x", ".hidden", "a/b", "a_b", "A_B", "", "x" * 300])
    assert names == {
        "@local": "raw/_local.txt",
        "../x": "raw/_.._x.txt",
        ".hidden": "raw/_.hidden.txt",
        "a/b": "raw/a_b.txt",
        "a_b": "raw/a_b~2.txt",
        "A_B": "raw/A_B~3.txt",
        "": "raw/_.txt",
        "x" * 300: f"raw/{'x' * 200}.txt",
    }


def test_junit_has_a_case_per_host_and_control(bundle: Bundle) -> None:
    """A case per host and control; the unreachable host's cases are errors; totals add up."""
    root = ET.fromstring(bundle.text("report.junit.xml"))
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [(case.get("classname"), case.get("name", "").split()[0]) for case in cases] == [
        (host, control) for host in [*LIVE, "dead"] for control in CONTROL_IDS
    ]
    dead = [case for case in cases if case.get("classname") == "dead"]
    assert all(case.find("error") is not None for case in dead)
    counts = {
        tag: sum(1 for case in cases if case.find(tag) is not None)
        for tag in ("failure", "error", "skipped")
    }
    assert suite.get("tests") == str(len(cases))
    assert suite.get("failures") == str(counts["failure"])
    assert suite.get("errors") == str(counts["error"]) == str(len(CONTROL_IDS))
    assert suite.get("skipped") == str(counts["skipped"])


def test_junit_controls_match_the_json(bundle: Bundle) -> None:
    """The same control results in both: a JUnit failure is a JSON fail, and so on."""
    kinds = {"failure": "fail", "error": "error", "skipped": "skip"}
    root = ET.fromstring(bundle.text("report.junit.xml"))
    for case in root.iter("testcase"):
        host = bundle.hosts()[case.get("classname", "")]
        control = case.get("name", "").split()[0]
        result = next(c["result"] for c in host["controls"] if c["id"] == control)
        found = next((kinds[tag] for tag in kinds if case.find(tag) is not None), "pass")
        assert found == result


def test_the_page_escapes_host_text(bundle: Bundle) -> None:
    """The odd host name appears only escaped: no markup of a host's reaches the page."""
    page = bundle.text("report.html")
    assert ODD not in page
    assert "&lt;b&gt;odd &amp; &#x27;quoted&#x27;&lt;/b&gt;" in page


def test_the_page_is_self_contained(bundle: Bundle) -> None:
    """No script, no stylesheet link, no image or font source, no URL: nothing to fetch."""
    page = bundle.text("report.html")
    for banned in ("<script", "<link", "<img", "<iframe", "src=", "url(", "@import", "://"):
        assert banned not in page.lower(), banned
    assert "@media print" in page


def test_an_out_directory_with_files_is_refused(tmp_path: Path) -> None:
    """--out must be new or empty: exit 2, nothing contacted, the file left alone."""
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["report", "-i", "dead,", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == f"ksm-guard: --out {tmp_path} exists and is not an empty directory"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_unwritable_out_is_a_usage_error(tmp_path: Path) -> None:
    """--out below a plain file: exit 2 before the audit."""
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["report", "-i", "dead,", "--out", str(tmp_path / "file" / "x")])
    assert result.exit_code == 2
    assert "cannot write the report" in result.stderr


def test_an_empty_out_directory_is_filled(tmp_path: Path) -> None:
    """@local into an existing empty directory: the bundle lands there; exit as audit's."""
    with locked():  # no real-KSM test of another session changes KSM between the two runs
        audit = runner.invoke(app, ["audit"])
        result = runner.invoke(app, ["report", "--out", str(tmp_path)])
    assert result.exit_code == audit.exit_code, result.output
    assert (tmp_path / "raw" / "_local.txt").exists()
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o755"


def test_a_report_sends_one_command_per_host(
    local_sshd: LocalSshd, write_inventory, on_the_wire: list[tuple[int, str]], tmp_path: Path
) -> None:
    """Counted at paramiko: the evidence rides in the one fact command, nothing else is sent."""
    inventory = write_inventory(inventory_source([local_sshd.host(n) for n in ("a", "b")]))
    result = runner.invoke(app, ["report", "-i", inventory, "--out", str(tmp_path / "out")])
    assert result.exit_code in (0, 1), result.output
    sent = [(port, shlex.split(command)) for port, command in on_the_wire]
    assert sent == [(local_sshd.port, ["sh", "-c", KSM_HOST_COMMAND])] * 2


NO_JAIL = unavailable()


@pytest.mark.skipif(NO_JAIL is not None, reason=NO_JAIL or "")
def test_a_report_asks_the_resolver_nothing(tmp_path: Path) -> None:
    """Behind a resolver that records every query: the whole report of @local asks none."""
    out = tmp_path / "out"
    done = run_jailed([str(BIN / "ksm-guard"), "report", "--out", str(out)], timeout=60)
    assert done.returncode in (0, 1), done.stderr
    assert done.queries == []
    assert (out / "SHA256SUMS").exists()


# -- the page in a real browser -------------------------------------------------------------


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
    return subprocess.run(
        [CHROMIUM, "--headless", *sandbox, "--disable-gpu", f"--user-data-dir={profile}",
         "--no-first-run", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _written(browser: Path, out: Path, flag: str, target: Path, *options: str) -> Path:
    """Have Chromium write ``target`` (--screenshot, --print-to-pdf) of the bundle's page."""
    done = _chromium(browser, f"{flag}={target}", *options, (out / "report.html").as_uri())
    assert target.exists(), done.stderr[-2000:]
    return target


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (make test-deps installs it)"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Path]:
    """A throwaway Chromium profile directory."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    yield profile
    shutil.rmtree(profile, ignore_errors=True)


class _Headings(HTMLParser):
    """The text of every <h2> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._inside = True
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.headings[-1] += data


@needs_chromium
def test_chromium_renders_the_page_with_hosts_and_verdicts(bundle: Bundle, browser: Path) -> None:
    """The DOM as Chromium built it: a heading per host with its verdict; every control ID."""
    done = _chromium(browser, "--dump-dom", (bundle.out / "report.html").as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    parser = _Headings()
    parser.feed(done.stdout)
    expected = [f"{name} {host['verdict']}" for name, host in bundle.hosts().items()]
    assert parser.headings == ["Fleet summary", "Capacity plan", *expected]
    for control in CONTROL_IDS:
        assert control in done.stdout


@needs_chromium
def test_chromium_screenshot_is_not_blank(bundle: Bundle, browser: Path, tmp_path: Path) -> None:
    """A 1200x1600 screenshot: many colours, plenty of ink, and the verdict colours drawn."""
    from ksm_guard.cli.html import COLORS

    shot = _written(
        browser, bundle.out, "--screenshot", tmp_path / "report.png", "--window-size=1200,1600"
    )
    census = colour_census(shot)
    assert (census.width, census.height) == (1200, 1600)
    assert len(census.colours) > 50
    assert census.not_white > census.width * census.height // 50  # over 2 % of pixels inked
    verdicts = {host["verdict"] for host in bundle.hosts().values()}
    for verdict, colour in COLORS.items():
        if verdict in verdicts:
            assert bytes.fromhex(colour[1:]) in census.colours, verdict


@needs_chromium
def test_chromium_prints_the_page_to_pdf(bundle: Bundle, browser: Path, tmp_path: Path) -> None:
    """Printed to PDF: a document with a page for the summary and one per host at least."""
    pdf = _written(
        browser, bundle.out, "--print-to-pdf", tmp_path / "report.pdf", "--no-pdf-header-footer"
    )
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    pages = len(re.findall(rb"/Type\s*/Page(?![s\w])", data))
    assert pages >= 1 + len(bundle.hosts())


# -- a fleet whose KSM really merges ---------------------------------------------------------

PICTURE = os.environ.get("KSM_GUARD_REPORT_PICTURE")  # e.g. docs/report.png: refresh the README's


@pytest.mark.realksm
@pytest.mark.skipif(
    not Path("/sys/kernel/mm/ksm/run").exists() or os.geteuid() != 0,
    reason="needs root and a kernel with KSM (/sys/kernel/mm/ksm)",
)
def test_a_merging_fleet_fails_its_controls_on_the_page(
    merged_pages: int,
    local_sshd: LocalSshd,
    browser: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    ksmd merging a workload's pages, this machine reached as three hosts (one with a tight
    unmerge limit) beside a dead one: ksm-running, KSM-1 and KSM-3 fail with the real page
    counts, and the page draws the merged memory, the need and the limit.
    """
    hosts = [
        local_sshd.host("pve-a1"),
        local_sshd.host("pve-a2", ksm_max_fraction=0.0005),
        local_sshd.host("pve-b1"),
        ("pve-b2", ssh_data(free_port(), local_sshd.key)),
    ]
    monkeypatch.chdir(tmp_path)  # the command line as an admin would type it
    Path("fleet.py").write_text(inventory_source(hosts))
    out = tmp_path / "evidence"
    argv = ["report", "-i", "fleet.py", "--out", "evidence", "--connect-timeout", "3"]
    monkeypatch.setattr(sys, "argv", ["ksm-guard", *argv])
    result = runner.invoke(app, argv)
    assert result.exit_code == 3, result.output
    document = json.loads((out / "report.json").read_text())
    live = [host for host in document["hosts"] if host["audit"] is not None]
    assert [host["host"] for host in live] == ["pve-a1", "pve-a2", "pve-b1"]
    for host in live:
        assert host["verdict"] == "ksm-running"
        failed = {c["id"]: c["message"] for c in host["controls"] if c["result"] == "fail"}
        assert "run=1" in failed["KSM-1"]
        assert f"pages_sharing={host['audit']['pages_sharing']}" in failed["KSM-3"]
        assert host["audit"]["pages_sharing"] > 0
    assert [host["audit"]["unmerge_safe"] for host in live] == [True, False, True]
    page = (out / "report.html").read_text()
    assert "over the limit" in page and "unmerge limit:" in page
    shot = _written(
        browser, out, "--screenshot", tmp_path / "report.png", "--window-size=1200,1500"
    )
    from ksm_guard.cli.html import COLORS, MERGED_COLOR, NEED_COLOR

    colours = colour_census(shot).colours
    for colour in (
        MERGED_COLOR,
        NEED_COLOR,
        COLORS[Verdict.KSM_RUNNING],
        COLORS[Verdict.UNREACHABLE],
    ):
        assert bytes.fromhex(colour[1:]) in colours, colour
    if PICTURE:
        shutil.copyfile(shot, PICTURE)


# -- controls and the bundle's pieces, from captured states ----------------------------------

FACTS = Path(__file__).parent / "facts/facts.KsmHost"


def _state(fixture: str) -> Any:
    return yaml.safe_load((FACTS / f"{fixture}.yaml").read_text())["fact"]


@pytest.mark.parametrize(
    ("fixture", "results"),
    [
        ("debian12_ksmtuned_running", ["fail", "fail", "fail", "fail"]),
        ("masked_and_persisted", ["pass", "pass", "pass", "pass"]),
        ("persist_modified_unknown_knob", ["fail", "pass", "fail", "fail"]),
        ("no_ksm_dir", ["pass", "pass", "pass", "skip"]),
        ("not_installed_non_root", ["pass", "pass", "fail", "fail"]),
        ("kernel_6_18_no_systemd_captured", ["pass", "pass", "pass", "fail"]),
    ],
)
def test_controls_of_captured_states(fixture: str, results: list[str]) -> None:
    """KSM-1..4 on captured hosts: merging, units, merged pages, boot persistence."""
    state = _state(fixture)
    assert [control.check(state, Policy.HOST).result for control in CONTROLS[:4]] == results


def test_control_messages_carry_the_figures() -> None:
    """A failing control says what it found: run, the unit states, the page counts, the file."""
    state = _state("debian12_ksmtuned_running")
    messages = [control.check(state, Policy.HOST).message for control in CONTROLS[:4]]
    assert messages == [
        "run=1: ksmd is merging",
        "ksmtuned.service enabled/active, ksm.service enabled/active",
        "pages_shared=64, pages_sharing=16320, ksm_zero_pages=0: an unmerge must find 63.8 MiB",
        "/etc/tmpfiles.d/ksm-guard.conf is absent: nothing holds run at 0 across a reboot",
    ]
    modified = _state("persist_modified_unknown_knob")
    assert "does not hold ksm-guard's line" in CONTROLS[3].check(modified, Policy.HOST).message


def _offline_report(name: str, detail: str) -> Any:
    from ksm_guard.cli.engine import HostResult, Reading, RunResult
    from ksm_guard.cli.evidence import Meta, build
    from ksm_guard.operations.model import Mode, Status
    from ksm_guard.operations.report import audit_record

    output = yaml_output("evidence_captured")
    state = parse_ksm_host(output)
    hosts = [
        HostResult("pve1", Status.OK, audit=audit_record(state)),
        HostResult(name, Status.UNREACHABLE, detail),
    ]
    result = RunResult(Mode.AUDIT, False, hosts, readings={"pve1": Reading(state, None, output)})
    return build(result, Meta.now("@local"))


def yaml_output(fixture: str) -> list[str]:
    output: list[str] = yaml.safe_load((FACTS / f"{fixture}.yaml").read_text())["output"]
    return output


def test_junit_holds_names_xml_cannot_carry() -> None:
    """A control character in a host name or a reason: replaced, and the XML still parses."""
    from ksm_guard.cli.evidence import junit

    report = _offline_report("odd\x01name", "refused\x1b[0m")
    root = ET.fromstring(junit(report))
    classnames = {case.get("classname") for case in root.iter("testcase")}
    assert classnames == {"pve1", "odd\ufffdname"}
    errors = [error.get("message") for error in root.iter("error")]
    assert errors == ["unreachable: refused\ufffd[0m"] * len(CONTROL_IDS)


def test_the_files_of_a_bundle_and_their_sums() -> None:
    """files(): the raw output byte for byte as pyinfra gave its lines; SHA256SUMS of each."""
    from ksm_guard.cli.evidence import files, sha256sums

    report = _offline_report("dead", "timed out")
    contents = files(report)
    assert sorted(contents) == ["raw/pve1.txt", "report.html", "report.json", "report.junit.xml"]
    assert contents["raw/pve1.txt"].decode().splitlines() == yaml_output("evidence_captured")
    sums = sha256sums(contents).decode().splitlines()
    assert sums[0] == f"{hashlib.sha256(contents['raw/pve1.txt']).hexdigest()}  raw/pve1.txt"
    assert [line.split("  ")[1] for line in sums] == sorted(contents)


def test_the_page_shows_the_plans_moves_and_qm_lines() -> None:
    """A fleet needing a move: the page's capacity section lists it with its qm migrate line."""
    from ksm_guard.cli.engine import HostResult, RunResult
    from ksm_guard.cli.evidence import Meta, Report
    from ksm_guard.cli.html import page
    from ksm_guard.operations.capacity import hosts_from_document, plan_capacity
    from ksm_guard.operations.model import Mode, Status
    from tests.test_capacity import load_case

    document, _, _ = load_case(Path(__file__).parent / "capacity" / "pools_per_cluster.yaml")
    results = [HostResult(h["host"], Status.OK) for h in document["hosts"]]  # the plan is apart
    capacity = plan_capacity(hosts_from_document(document))
    html = page(Report(Meta.now("@local"), RunResult(Mode.AUDIT, False, results), [], capacity))
    section = html[html.index('<section id="capacity">') :].split("</section>")[0]
    assert "<code>on pve-a1: qm migrate 101 pve-a2 --online</code>" in section
    assert "VM 101 (web): pve-a1 → 10.0.1.2, 10.0 GiB" in section
    assert "cluster west (pve-b1, pve-b2): cannot be made safe, 8.4 GiB of RAM missing" in section
    assert "fleet of 4 pools: 7 host(s)" in section
