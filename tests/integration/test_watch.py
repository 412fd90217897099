"""
The drift watch end to end, for real: a pve-flavoured Debian 13 guest with Debian's
prometheus-node-exporter, its port 9100 forwarded to loopback, scraped by a real Prometheus
started here (127.0.0.1, 2 s scrape and evaluation, a copy of monitoring/'s rules with
``for: 0s``). The tests build on each other, in order, on one guest:

install (compliant) → drift by hand (alerts fire) → heal (alerts resolve, counter 1) → audit
reports the watch → every Grafana query runs → enable removes it (the missing-watch alert fires).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_scenarios import ksm_guard
from tests.promserver import (
    PROMETHEUS,
    Prometheus,
    dashboard_queries,
    prometheus,
    short_rules,
)
from tests.results import hosts_of
from tests.vm.guest import Guest
from tests.vm.inventory import write_inventory
from tests.vm.session import VmSession

pytestmark = pytest.mark.xdist_group("watch")  # one guest, its tests in order

WATCH_FILES = (
    "/usr/local/sbin/ksm-guard-watch",
    "/etc/systemd/system/ksm-guard-watch.service",
    "/etc/systemd/system/ksm-guard-watch.timer",
)
PROM_FILE = "/var/lib/prometheus/node-exporter/ksm_guard.prom"
# Seconds for a scrape and an evaluation to show a change (2 s each). Generous: the TCG guest
# is slow while ksmd merges in it (after `enable`), and a scrape that fails or times out leaves
# `up` at 0 and the guest's series stale until the next one that succeeds.
BOUND = 150


class Stand:
    """The guest, its inventory file and the Prometheus scraping it."""

    def __init__(self, guest: Guest, inventory: str, server: Prometheus) -> None:
        self.guest = guest
        self.inventory = inventory
        self.server = server

    def run(self, *args: str) -> dict[str, Any]:
        """A ksm-guard command on the guest, -o json; its host entry."""
        result = ksm_guard(*args, "-i", self.inventory, "-o", "json")
        assert result.returncode in (0, 1), result.stderr
        return hosts_of(result)[self.guest.name]

    def sample(self, expr: str) -> float | None:
        """The value of an instant query with one series now (None: no series)."""
        result = self.server.query(expr)
        return float(result[0]["value"][1]) if result else None

    def value(self, expr: str) -> float:
        """The value of an instant query with one series, waiting for the series: a scrape of
        the TCG guest can fail or time out now and then (2 s), and Prometheus then marks the
        guest's series stale until the next scrape that succeeds."""
        result = self.server.wait(
            f"a series for {expr}", lambda: self.server.query(expr), BOUND, every=1
        )
        return float(result[0]["value"][1])

    def wait_value(self, expr: str, want: float) -> None:
        self.server.wait(f"{expr} == {want}", lambda: self.sample(expr) == want, BOUND, every=1)

    def firing(self) -> set[str]:
        """The names of the alerts firing for this guest (by ``host`` label or target)."""
        target = self.server_target
        return {
            alert["labels"]["alertname"]
            for alert in self.server.alerts()
            if alert["state"] == "firing"
            and (
                alert["labels"].get("host") == self.guest.name
                or alert["labels"].get("instance") == target
            )
        }

    @property
    def server_target(self) -> str:
        return f"127.0.0.1:{self.guest.metrics_port}"

    def trigger(self) -> None:
        """One run of the watch now, as its timer would start it."""
        self.guest.ssh("systemctl start ksm-guard-watch.service")

    def drift(self) -> None:
        """What a package upgrade could do: ksmtuned enabled and started, run=1."""
        self.guest.ssh("systemctl enable --now ksmtuned.service 2>/dev/null")
        # ksmtuned may write run=0 as it starts: wait until run has read 1 across one of its
        # 2 s adjustments, writing 1 as an admin would meanwhile.
        self.guest.ssh(
            "f=/sys/kernel/mm/ksm/run; for i in $(seq 1 40); do echo 1 > $f; sleep 2.5;"
            ' [ "$(cat $f)" = 1 ] && exit 0; done; exit 1'
        )


@pytest.fixture(scope="module")
def stand(vm_session: VmSession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    """A pve guest (ksmtuned on, run=1) and a Prometheus scraping its node_exporter."""
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is missing: scripts/bootstrap.sh --test installs it")
    work = tmp_path_factory.mktemp("watch")
    guest = vm_session.start("pve", name="pve-watch")
    try:
        guest.ssh("systemctl is-active prometheus-node-exporter.service")
        inventory = str(write_inventory(work / "vms.py", [guest]))
        rules = short_rules(work / "rules.yml")
        target = f"127.0.0.1:{guest.metrics_port}"
        # Only the textfile collector: the alerts and the dashboard read ksm_guard_* and `up`,
        # and a full node_exporter scrape of a busy TCG guest can outlast the 2 s timeout.
        with prometheus(work, [target], [rules], interval="2s", collectors=["textfile"]) as server:
            yield Stand(guest, inventory, server)
    finally:
        vm_session.release([guest])


def _sample(stand: Stand, name: str) -> str:
    return f'{name}{{host="{stand.guest.name}"}}'


def test_disable_watch_installs_and_reports_compliant(stand: Stand) -> None:
    """disable --watch: changed; the scraped metrics say compliant, with the watch's last run."""
    host = stand.run("disable", "--watch", "--yes")
    assert host["status"] == "changed"
    assert any(change.startswith("drift watch: absent → installed") for change in host["changes"])
    stand.wait_value(_sample(stand, "ksm_guard_compliant"), 1)
    assert stand.value(_sample(stand, "ksm_guard_run")) == 0
    assert stand.value(_sample(stand, "ksm_guard_watch_heals_total")) == 0
    assert stand.value(_sample(stand, "ksm_guard_watch_last_run_timestamp_seconds")) > 0


def test_disable_watch_again_changes_nothing(stand: Stand) -> None:
    """Idempotent: the second run finds the watch installed as asked."""
    host = stand.run("disable", "--watch", "--yes")
    assert (host["status"], host["changes"]) == ("ok", [])


@pytest.mark.parametrize("path", WATCH_FILES)
def test_the_watch_files_are_installed(stand: Stand, path: str) -> None:
    """Script and units present, owned by root."""
    file = stand.guest.testinfra_host().file(path)
    assert file.exists and file.user == "root"


def test_the_timer_is_enabled_and_waiting(stand: Stand) -> None:
    """ksm-guard-watch.timer enabled and active."""
    timer = stand.guest.testinfra_host().service("ksm-guard-watch.timer")
    assert timer.is_enabled and timer.is_running


def test_no_ksm_alert_fires_while_compliant(stand: Stand) -> None:
    """After a few evaluations, none of the KSM alerts fires for the guest."""
    stand.server.wait(
        "a rule evaluation after the first scrape",
        lambda: stand.server.api("rules")["groups"][0]["rules"][0].get("lastEvaluation"),
        BOUND,
    )
    assert not stand.firing() & {"KsmMerging", "KsmUnitEnabled", "KsmMergedPagesRemain"}


def test_drift_by_hand_fires_the_alerts(stand: Stand) -> None:
    """ksmtuned re-enabled and run=1 by hand, a watch run: KsmMerging and KsmUnitEnabled fire."""
    stand.drift()
    stand.trigger()
    stand.server.wait(
        "KsmMerging and KsmUnitEnabled firing",
        lambda: {"KsmMerging", "KsmUnitEnabled"} <= stand.firing(),
        BOUND,
        every=1,
    )
    assert stand.value(_sample(stand, "ksm_guard_compliant")) == 0


def test_the_watch_without_heal_left_the_drift(stand: Stand) -> None:
    """Report only: run is still 1 and no heal counted."""
    assert stand.guest.ssh("cat /sys/kernel/mm/ksm/run").stdout.strip() == "1"
    assert stand.value(_sample(stand, "ksm_guard_watch_heals_total")) == 0


def test_heal_switches_drift_off_and_the_alerts_resolve(stand: Stand) -> None:
    """disable --heal, drift again, a watch run: run=0, ksmtuned off, 1 heal, alerts resolved."""
    host = stand.run("disable", "--heal", "--yes")
    assert any(change.startswith("drift watch: outdated") for change in host["changes"])
    stand.drift()
    stand.trigger()
    assert stand.guest.ssh("cat /sys/kernel/mm/ksm/run").stdout.strip() == "0"
    stand.wait_value(_sample(stand, "ksm_guard_watch_heals_total"), 1)
    stand.server.wait(
        "the KSM alerts resolved",
        lambda: not stand.firing() & {"KsmMerging", "KsmUnitEnabled"},
        BOUND,
        every=1,
    )
    assert stand.value(_sample(stand, "ksm_guard_compliant")) == 1


def test_heal_stopped_and_disabled_ksmtuned(stand: Stand) -> None:
    """ksmtuned.service disabled and inactive after the heal."""
    service = stand.guest.testinfra_host().service("ksmtuned.service")
    assert not service.is_enabled and not service.is_running


def test_heal_logged_one_warning_with_before_and_after(stand: Stand) -> None:
    """The journal has the heal line (priority warning) with the state before and after."""
    lines = stand.guest.ssh(
        "journalctl -t ksm-guard-watch -p warning -o cat --no-pager"
    ).stdout.splitlines()
    assert len(lines) == 1
    before, _, after = lines[0].partition("; after ")
    # run itself may read 0 or 1 before: ksmtuned rewrites it every 2 s (the heal reads it again
    # after stopping ksmtuned for that reason).
    assert re.search(r"before run=[01] ksmtuned\.service=enabled/active", before)
    assert after.startswith("run=0 ksmtuned.service=disabled/inactive")


def test_audit_reports_the_watch(stand: Stand) -> None:
    """audit -o json: the watch installed, ran within its interval, one heal, no finding."""
    watch = stand.run("audit")["audit"]["watch"]
    assert watch["installed"] is True
    assert watch["heals"] == 1
    assert 0 <= watch["age_seconds"] < watch["interval"] == 300
    assert (watch["stale"], watch["finding"]) == (False, None)


def test_every_dashboard_query_runs_over_real_metrics(stand: Stand) -> None:
    """Each Grafana query answers without an error; the host series ones return the guest."""
    for expr in dashboard_queries():
        stand.server.query(expr)

    def hosts() -> set[str]:
        return {series["metric"]["host"] for series in stand.server.query("ksm_guard_compliant")}

    # A scrape of the TCG guest can fail or time out now and then: its series go stale until
    # the next one, so wait for them rather than read once.
    stand.server.wait(
        "the guest's host series", lambda: stand.guest.name in hosts(), BOUND, every=1
    )


def test_enable_removes_the_watch(stand: Stand) -> None:
    """enable: the change says so; the files, state and metrics are gone."""
    host = stand.run("enable", "--yes")
    assert "drift watch: installed → absent" in host["changes"]
    paths = " ".join((*WATCH_FILES, PROM_FILE, "/var/lib/ksm-guard/watch.state"))
    left = stand.guest.ssh(f"for f in {paths}; do ! test -e $f || echo $f; done").stdout
    assert left == ""


def test_without_the_watch_the_missing_alert_fires(stand: Stand) -> None:
    """node_exporter still answers, the watch series are gone: KsmGuardWatchMissing fires."""
    stand.server.wait(
        "KsmGuardWatchMissing firing",
        lambda: "KsmGuardWatchMissing" in stand.firing(),
        BOUND,
        every=1,
    )
    assert stand.sample(_sample(stand, "ksm_guard_up")) is None


def test_admin_with_sudo_installs_and_removes_the_watch(stand: Stand, tmp_path: Path) -> None:
    """As admin with --sudo: disable --watch installs it (root's files), enable removes it."""
    inventory = str(
        write_inventory(tmp_path / "admin.py", [stand.guest.pyinfra_host("admin", sudo=False)])
    )
    name = f"{stand.guest.name}-admin"
    installed = hosts_of(
        ksm_guard("disable", "--watch", "--sudo", "--yes", "-i", inventory, "-o", "json")
    )
    assert installed[name]["status"] == "changed"
    owner = stand.guest.ssh("stat -c %U /usr/local/sbin/ksm-guard-watch").stdout.strip()
    assert owner == "root"
    label = stand.guest.ssh(f"grep -c 'host=\"{name}\"' {PROM_FILE}").stdout.strip()
    assert int(label) > 0
    removed = hosts_of(ksm_guard("enable", "--sudo", "--yes", "-i", inventory, "-o", "json"))
    assert "drift watch: installed → absent" in removed[name]["changes"]
    assert stand.guest.ssh("test -e /usr/local/sbin/ksm-guard-watch", check=False).returncode == 1
