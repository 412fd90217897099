"""The drift watch as the audit reports it, and its host data settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from ksm_guard.operations.model import HostState, SettingsError, WatchState, settings_from_data
from ksm_guard.operations.report import audit_line, audit_record
from ksm_guard.operations.watch import FILES, watch_record

FACTS = Path(__file__).parent / "facts" / "facts.KsmHost"


def _watch(**changes: object) -> WatchState:
    watch = {
        "now": 10_000,
        "files": dict.fromkeys(FILES, "0" * 64),
        "last_run": 9_800,
        "heals": 0,
        "interval": 300,
        "textfile": "/var/lib/prometheus/node-exporter/ksm_guard.prom",
    }
    watch.update(changes)
    return cast(WatchState, watch)


def test_a_recent_run_is_no_finding() -> None:
    """Installed, last run 200 s ago, every 300 s: current."""
    record = watch_record(_watch())
    assert record is not None
    assert (record["installed"], record["stale"], record["finding"]) == (True, False, None)
    assert record["age_seconds"] == 200


def test_a_run_older_than_two_intervals_is_stale() -> None:
    """Last run 601 s ago, every 300 s: a finding."""
    record = watch_record(_watch(last_run=9_399))
    assert record is not None
    assert record["stale"]
    assert record["finding"] == "the drift watch is stale: last run 601 s ago, every 300 s"


def test_an_installed_watch_that_never_ran_is_stale() -> None:
    """No state file yet: a finding."""
    record = watch_record(_watch(last_run=None, interval=None))
    assert record is not None
    assert record["finding"] == "the drift watch is installed but has never run"


def test_a_watch_missing_a_file_is_incomplete() -> None:
    """The timer file gone: not installed, and said so."""
    files = dict.fromkeys(FILES[:2], "0" * 64)
    record = watch_record(_watch(files=files))
    assert record is not None
    assert not record["installed"]
    assert record["finding"] == (
        "the drift watch is incomplete: /etc/systemd/system/ksm-guard-watch.timer missing"
    )


def test_no_watch_section_is_none() -> None:
    """A read from before the section existed: the audit's ``watch`` is null."""
    assert watch_record(None) is None


def test_the_audit_line_names_a_stale_watch() -> None:
    """The fixture's watch last ran 1200 s before the read: the audit says it is stale."""
    state = cast(
        HostState, yaml.safe_load((FACTS / "watch_installed_stale.yaml").read_text())["fact"]
    )
    record = audit_record(state)
    assert record["watch"] is not None and record["watch"]["heals"] == 1
    assert audit_line(record).endswith(
        "; the drift watch is stale: last run 1200 s ago, every 300 s"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"ksm_watch_interval": "5"},
            "ksm_watch_interval must be whole seconds from 10 to 86400, not '5'",
        ),
        ({"ksm_watch_heal": "maybe"}, "ksm_watch_heal must be true or false, not 'maybe'"),
        (
            {"ksm_watch_textfile_dir": "relative/dir"},
            "ksm_watch_textfile_dir must be an absolute path without spaces or quotes, "
            "not 'relative/dir'",
        ),
    ],
)
def test_bad_watch_settings_are_one_line(data: dict[str, object], message: str) -> None:
    """Each bad watch setting is refused with one line naming it."""
    with pytest.raises(SettingsError) as raised:
        settings_from_data({"ksm_mode": "disable", **data})
    assert str(raised.value) == message


def test_watch_settings_from_host_data() -> None:
    """ksm_watch, _heal, _interval, _textfile_dir and the host label from the inventory name."""
    _, options = settings_from_data(
        {
            "ksm_mode": "disable",
            "ksm_watch": "true",
            "ksm_watch_heal": True,
            "ksm_watch_interval": 60,
            "ksm_watch_textfile_dir": "/srv/textfile/",
        },
        "pve1.example.net",
    )
    assert (
        options.watch,
        options.watch_heal,
        options.watch_interval,
        options.watch_textfile_dir,
        options.watch_host,
    ) == (True, True, 60, "/srv/textfile", "pve1.example.net")


def test_the_audit_table_notes_a_stale_watch() -> None:
    """``audit`` (table) adds a note line naming the host and the finding."""
    from ksm_guard.cli.engine import HostResult, RunResult
    from ksm_guard.cli.render import table
    from ksm_guard.operations.model import Mode, Status

    state = cast(
        HostState, yaml.safe_load((FACTS / "watch_installed_stale.yaml").read_text())["fact"]
    )
    result = RunResult(
        Mode.AUDIT, False, [HostResult("pve1", Status.OK, audit=audit_record(state))]
    )
    assert (
        "pve1: the drift watch is stale: last run 1200 s ago, every 300 s"
        in table(result).splitlines()
    )


@pytest.mark.parametrize(
    ("options", "data"),
    [
        ({"watch": True}, {"ksm_watch": True}),
        ({"heal": True}, {"ksm_watch": True, "ksm_watch_heal": True}),
        ({"watch": True, "watch_interval": 60}, {"ksm_watch": True, "ksm_watch_interval": 60}),
        ({}, {}),
    ],
)
def test_the_cli_options_set_the_host_data(
    options: dict[str, object], data: dict[str, object]
) -> None:
    """--watch, --heal (implies --watch) and --watch-interval set the keys deploy.py reads."""
    from ksm_guard.cli.engine import Request
    from ksm_guard.operations.model import Mode

    request = Request(mode=Mode.DISABLE, **options)  # type: ignore[arg-type]
    assert request.override_data() == {"ksm_mode": "disable", **data}


@pytest.mark.parametrize("flag", ["--dry-run", "--yes"])
def test_a_bad_watch_setting_refuses_the_host_in_dry_and_real_runs(
    flag: str, write_inventory: Any
) -> None:
    """disable --watch with ksm_watch_interval=5: refused as bad settings, exit 1, the same line
    in the dry run and the real run; nothing of the watch is written."""
    import json

    from typer.testing import CliRunner

    from ksm_guard.cli.app import app
    from ksm_guard.operations.watch import FILES as WATCH_FILES

    inventory = write_inventory("hosts = [('@local', {'ksm_watch_interval': '5'})]\n")
    result = CliRunner().invoke(app, ["disable", "--watch", flag, "-i", inventory, "-o", "json"])
    host = json.loads(result.stdout)["hosts"][0]
    assert (result.exit_code, host["status"]) == (1, "refused"), result.output
    assert host["refusal"]["code"] == "bad-settings"
    assert (
        "ksm_watch_interval must be whole seconds from 10 to 86400, not '5'"
        in (host["refusal"]["reason"])
    )
    assert not any(Path(path).exists() for path in WATCH_FILES)
