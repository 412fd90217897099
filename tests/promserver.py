"""
A real Prometheus (Debian's ``/usr/bin/prometheus``) for the tests: on 127.0.0.1, a temp config
and storage, short scrape and evaluation intervals; queried through its HTTP API.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench.netutil import free_port

PROMETHEUS = "/usr/bin/prometheus"
MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "ksm-guard.rules.yml"
DASHBOARD = MONITORING / "ksm-guard.dashboard.json"


def short_rules(target: Path, hold: str = "0s") -> Path:
    """A copy of the shipped rules with every ``for:`` set to ``hold``."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = hold
    target.write_text(yaml.safe_dump(rules, sort_keys=False))
    return target


def dashboard_queries() -> list[str]:
    """Every ``expr`` of the Grafana dashboard, its ``$host`` variable set to all hosts."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        re.sub(r"\$host\b", ".*", target["expr"])
        for panel in panels
        for target in panel.get("targets", [])
    ]


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``'s ``data``; an error status raises with Prometheus' message."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or other result)."""
        return list(self.api("query", query=expr)["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts now pending or firing."""
        return list(self.api("alerts")["alerts"])

    def wait(self, what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
        """Poll ``check()`` until it returns something true; fail naming ``what`` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s; {self.scrapes()}")
            time.sleep(every)

    def scrapes(self) -> str:
        """Each target's last scrape, for a failure message: health, duration, error."""
        targets = self.api("targets")["activeTargets"]
        return (
            "; ".join(
                f"{target['scrapeUrl']} {target['health']} ({target['lastScrapeDuration']:.2f} s"
                + (f", {target['lastError']})" if target["lastError"] else ")")
                for target in targets
            )
            or "no targets"
        )


@contextmanager
def prometheus(
    workdir: Path,
    targets: list[str],
    rule_files: list[Path],
    interval: str = "1s",
    collectors: list[str] | None = None,
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (job ``node``) every ``interval``, with ``rule_files``;
    ``collectors`` asks node_exporter for those collectors only (its ``collect[]`` parameter)."""
    port = free_port()
    job: dict[str, Any] = {"job_name": "node", "static_configs": [{"targets": targets}]}
    if collectors:
        job["params"] = {"collect[]": collectors}
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [job],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as ready:
                    if ready.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Prometheus did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
