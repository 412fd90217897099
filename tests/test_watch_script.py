"""
The drift watch's shell script, run with /bin/sh over a fake sysfs, systemd and tmpfiles tree made
from every host-state fixture: its metrics must equal ``-o prometheus`` of the Python audit of
the same state (host series; the watch adds its own two), and its heal must do what it says.

Real: /bin/sh (dash), getconf, grep, mktemp, sed. Fake, because nothing real can run here: the
sysfs tree is plain files, and ``systemctl`` and ``logger`` are stand-ins that record their calls
(the VM test, tests/integration/test_watch.py, runs the script on a real systemd and kernel).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ksm_guard.cli.engine import HostResult, RunResult
from ksm_guard.cli.prometheus import render
from ksm_guard.operations.controls import HOST_RULES, evaluate
from ksm_guard.operations.model import PERSIST_LINE, UNITS, HostState, Mode, Status
from ksm_guard.operations.report import audit_record
from ksm_guard.operations.watch import TEXTFILE_NAME, WATCH_METRICS, WatchConfig
from ksm_guard.operations.watchscript import Paths, script

TESTS = Path(__file__).parent
FACTS = TESTS / "facts" / "facts.KsmHost"
PAGE_SIZE = int(subprocess.run(["getconf", "PAGESIZE"], capture_output=True, text=True).stdout)

# systemctl: ``show`` prints show.txt; ``disable``/``stop`` change it as systemd would and are
# logged, so that a heal is seen by the next read.
FAKE_SYSTEMCTL = r"""#!/bin/sh
here=$(dirname "$0")
verb=$1; shift
case $verb in
  show) cat "$here/show.txt" ;;
  disable | stop)
    echo "$verb $*" >> "$here/calls.log"
    # A ksmtuned writing run=1 as it is stopped (FAKE_RUN_ON_STOP), after the watch's read.
    if [ "$verb" = stop ] && [ -n "${FAKE_RUN_ON_STOP:-}" ]; then echo 1 > "$here/../ksm/run"; fi
    if [ "$verb" = disable ]; then key=UnitFileState value=disabled
    else key=ActiveState value=inactive; fi
    awk -v unit="$1" -v key="$key" -v value="$value" -F= '
      $1 == "Id" { current = $2 }
      current == unit && $1 == key { print key "=" value; next }
      { print }' "$here/show.txt" > "$here/show.new" && mv "$here/show.new" "$here/show.txt" ;;
  *) echo "unexpected systemctl $verb" >&2; exit 1 ;;
esac
"""
FAKE_LOGGER = '#!/bin/sh\nprintf "%s\\n" "$*" >> "$(dirname "$0")/journal.log"\n'


def _states() -> list[tuple[str, HostState]]:
    """Every host state the fixtures hold: the fact fixtures, and the plan cases' variants."""
    states = []
    for path in sorted(FACTS.glob("*.yaml")):
        states.append((f"facts/{path.stem}", yaml.safe_load(path.read_text())["fact"]))
    for path in sorted((TESTS / "plans").glob("*/*.yaml")):
        case = yaml.safe_load(path.read_text())
        if not case.get("state"):
            continue
        state = yaml.safe_load((FACTS / f"{case['fact']}.yaml").read_text())["fact"]
        state.update(case["state"])
        states.append((f"plans/{path.parent.name}/{path.stem}", state))
    return [(name, cast(HostState, {**state, "page_size": PAGE_SIZE})) for name, state in states]


STATES = _states()


class Host:
    """A fake host tree the script runs over, and the script's results."""

    def __init__(self, root: Path, state: HostState, config: WatchConfig) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.paths = Paths(
            ksm_dir=str(root / "ksm"),
            systemd_dir=str(root / "run-systemd"),
            persist=str(root / "ksm-guard.conf"),
            state=str(root / "state" / "watch.state"),
        )
        self.textfile = root / "textfile" / TEXTFILE_NAME
        config = WatchConfig(config.host, config.interval, config.heal, str(self.textfile.parent))
        self.script = root / "ksm-guard-watch"
        self.script.write_text(script(config, self.paths))
        if state["ksm"] is not None:
            (root / "ksm").mkdir()
            for name, value in state["ksm"].items():
                text = "[none] scan-time" if name == "advisor_mode" else str(value)
                (root / "ksm" / name).write_text(f"{text}\n")
        if state["systemd"]:
            (root / "run-systemd").mkdir()
        if state["persist"] != "absent":
            line = PERSIST_LINE if state["persist"] == "present" else "w /tmp/other - - - - 0"
            (root / "ksm-guard.conf").write_text(f"{line}\n")
        blocks = []
        for name in UNITS:
            unit = state["units"].get(name)
            load, active, unit_file = (
                (unit["load"], unit["active"], unit["unit_file"])
                if unit
                else ("not-found", "inactive", "")
            )
            blocks.append(
                f"Id={name}\nLoadState={load}\nActiveState={active}\nUnitFileState={unit_file}\n"
            )
        (self.bin / "show.txt").write_text("\n".join(blocks))
        for name, text in (("systemctl", FAKE_SYSTEMCTL), ("logger", FAKE_LOGGER)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)

    def run(self, **extra_env: str) -> None:
        env = {**os.environ, **extra_env, "PATH": f"{self.bin}:/usr/bin:/bin"}
        done = subprocess.run(
            ["/bin/sh", str(self.script)], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return _samples(self.textfile.read_text())

    def read(self, name: str) -> str:
        path = self.bin / name
        return path.read_text() if path.exists() else ""


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _python_metrics(state: HostState, host: str) -> dict[Any, float]:
    """``-o prometheus`` of the Python audit, host series only (the watch has no VM series)."""
    result = RunResult(Mode.AUDIT, False, [HostResult(host, Status.OK, audit=audit_record(state))])
    return {
        key: value
        for key, value in _samples(render(result)).items()
        if not key[0].startswith("ksm_guard_vm_")
    }


@pytest.mark.parametrize(("name", "state"), STATES, ids=[name for name, _ in STATES])
def test_the_script_gives_the_python_metrics(tmp_path: Path, name: str, state: HostState) -> None:
    """The script's host series equal ``-o prometheus`` of the Python audit, sample by sample."""
    host = Host(tmp_path, state, WatchConfig("pve1"))
    host.run()
    got = host.samples()
    host_series = {key: value for key, value in got.items() if key[0] not in WATCH_METRICS}
    assert host_series == _python_metrics(state, "pve1")


@pytest.mark.parametrize(("name", "state"), STATES, ids=[name for name, _ in STATES])
def test_the_script_judges_each_rule_as_python(tmp_path: Path, name: str, state: HostState) -> None:
    """Each host-policy control: passed 1 / 0 / absent exactly as the Python control's result."""
    host = Host(tmp_path, state, WatchConfig("pve1"))
    host.run()
    got = {
        dict(labels)["control"]: value
        for (metric, labels), value in host.samples().items()
        if metric == "ksm_guard_control_passed"
    }
    want = {
        control.id: float(outcome.result == "pass")
        for control, outcome in evaluate(state)
        if control.id in HOST_RULES and outcome.result != "skip"
    }
    assert got == want


def test_the_watch_series_say_when_it_ran(tmp_path: Path) -> None:
    """Last run is the host's clock at the run; no heal counted without ``heal``."""
    state = yaml.safe_load((FACTS / "debian12_ksmtuned_running.yaml").read_text())["fact"]
    host = Host(tmp_path, state, WatchConfig("pve1"))
    before = time.time()
    host.run()
    got = host.samples()
    on = frozenset({("host", "pve1")})
    assert before - 1 <= got[("ksm_guard_watch_last_run_timestamp_seconds", on)] <= time.time()
    assert got[("ksm_guard_watch_heals_total", on)] == 0
    assert got[("ksm_guard_compliant", on)] == 0
    assert host.read("calls.log") == ""


def test_an_odd_host_label_is_escaped(tmp_path: Path) -> None:
    """A host name with a quote, backslash and percent sign reads back as it was."""
    state = yaml.safe_load((FACTS / "no_ksm_dir.yaml").read_text())["fact"]
    odd = 'pve "1" \\ 100%'
    host = Host(tmp_path, state, WatchConfig(odd))
    host.run()
    assert ("ksm_guard_up", frozenset({("host", odd)})) in host.samples()


@pytest.fixture
def drifted(tmp_path: Path) -> Host:
    """ksmtuned enabled and active, run=1, merged pages: healed by a watch with ``heal``."""
    state = yaml.safe_load((FACTS / "debian12_ksmtuned_running.yaml").read_text())["fact"]
    host = Host(tmp_path, state, WatchConfig("pve1", heal=True))
    host.run()
    return host


def test_heal_writes_run_0(drifted: Host) -> None:
    """run 1 → 0 (never 2: an unmerge needs its preflight)."""
    assert (Path(drifted.paths.ksm_dir) / "run").read_text().strip() == "0"


def test_heal_stops_and_disables_the_units(drifted: Host) -> None:
    """systemctl disable and stop of each unit that was on, nothing else."""
    assert drifted.read("calls.log").splitlines() == [
        "disable ksmtuned.service",
        "stop ksmtuned.service",
        "disable ksm.service",
        "stop ksm.service",
    ]


def test_heal_logs_one_line_with_before_and_after(drifted: Host) -> None:
    """One warning to the journal: tag, priority, the state before and after."""
    assert drifted.read("journal.log").splitlines() == [
        "-t ksm-guard-watch -p daemon.warning KSM drift healed (run=0, units stopped and "
        "disabled): before run=1 ksmtuned.service=enabled/active ksm.service=enabled/active; "
        "after run=0 ksmtuned.service=disabled/inactive ksm.service=disabled/inactive"
    ]


def test_heal_counts_and_reports_the_state_after(drifted: Host) -> None:
    """heals_total 1; KSM-1 and KSM-2 pass after the heal; merged pages still fail KSM-3."""
    got = drifted.samples()
    on = frozenset({("host", "pve1")})
    assert got[("ksm_guard_watch_heals_total", on)] == 1
    passed = {
        dict(labels)["control"]: value
        for (metric, labels), value in got.items()
        if metric == "ksm_guard_control_passed"
    }
    assert passed == {"KSM-1": 1, "KSM-2": 1, "KSM-3": 0, "KSM-4": 0}


def test_the_heal_count_survives_runs(drifted: Host) -> None:
    """A second run without drift keeps 1; drift again makes it 2."""
    drifted.run()
    on = frozenset({("host", "pve1")})
    assert drifted.samples()[("ksm_guard_watch_heals_total", on)] == 1
    (Path(drifted.paths.ksm_dir) / "run").write_text("1\n")
    drifted.run()
    assert drifted.samples()[("ksm_guard_watch_heals_total", on)] == 2


def test_heal_reads_run_again_after_stopping_the_units(tmp_path: Path) -> None:
    """run read 0, ksmtuned writes 1 as it is stopped: the heal still leaves run=0."""
    state = yaml.safe_load((FACTS / "debian12_ksmtuned_running.yaml").read_text())["fact"]
    state["ksm"]["run"] = 0
    host = Host(tmp_path, state, WatchConfig("pve1", heal=True))
    host.run(FAKE_RUN_ON_STOP="1")
    assert (Path(host.paths.ksm_dir) / "run").read_text().strip() == "0"
    assert "after run=0 " in host.read("journal.log")


def test_the_metrics_file_is_replaced_atomically(drifted: Host) -> None:
    """Only ksm_guard.prom is left in the textfile directory (the temp file was renamed)."""
    assert [path.name for path in drifted.textfile.parent.iterdir()] == [TEXTFILE_NAME]
    assert oct(drifted.textfile.stat().st_mode & 0o777) == "0o644"


def test_a_run_stopped_mid_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """SIGTERM to the run's process group (``systemctl stop``, as ``enable`` does before it deletes
    the files) while the metrics are half written: exit 143, nothing left in the directory."""
    state = yaml.safe_load((FACTS / "debian12_ksmtuned_running.yaml").read_text())["fact"]
    host = Host(tmp_path, state, WatchConfig("pve1"))
    # A chmod that hangs: the run is stopped after the temp file was written, before the rename.
    (host.bin / "chmod").write_text('#!/bin/sh\ntouch "$(dirname "$0")/blocked"\nexec sleep 60\n')
    (host.bin / "chmod").chmod(0o755)
    env = {**os.environ, "PATH": f"{host.bin}:/usr/bin:/bin"}
    run = subprocess.Popen(["/bin/sh", str(host.script)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (host.bin / "blocked").exists():
            assert time.monotonic() < deadline, "the run never reached its chmod"
            time.sleep(0.05)
        assert [path.name for path in host.textfile.parent.iterdir()] != []
        os.killpg(run.pid, signal.SIGTERM)
        assert run.wait(timeout=30) == 143
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert list(host.textfile.parent.iterdir()) == []


def test_the_state_file_is_readable_by_all(drifted: Host) -> None:
    """0644: a non-root audit reads the watch's last run too."""
    assert oct(Path(drifted.paths.state).stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("heal", [False, True])
def test_the_installed_script_is_shellcheck_clean(tmp_path: Path, heal: bool) -> None:
    """Debian's shellcheck, as POSIX sh, finds nothing in the script as installed."""
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: scripts/bootstrap.sh --test installs it")
    path = tmp_path / "ksm-guard-watch"
    path.write_text(script(WatchConfig('pve "1"', heal=heal)))
    done = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
