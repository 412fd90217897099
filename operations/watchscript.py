"""
The drift watch's files: a POSIX sh script and its systemd service and timer.

The script reads the host with the very shell pieces of the ``KsmHost`` fact, judges it by the
host policy's rules (``controls.HOST_RULES``, the same data the Python controls are made of),
optionally heals drift, and writes the ``-o prometheus`` host metrics atomically for
node_exporter's textfile collector. No Python on the host.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .controls import CONTROLS, HOST_RULES, KsmBits, UnitOn, shell_name
from .facts import SYSTEMD_DIR, ksm_read, persist_read, units_read
from .model import KSM_DIR, PERSIST_PATH, UNITS
from .report import ACTIVE_STATES
from .watch import (
    METRICS,
    SCRIPT_PATH,
    SERVICE,
    SERVICE_PATH,
    STATE_PATH,
    TEXTFILE_NAME,
    TIMER_PATH,
    WATCH_METRICS,
    WatchConfig,
    escape_label,
)

# The KSM files the script keeps (``ksm_<name>``): what the rules and the metrics read.
_KSM_FILES = ("run", "pages_shared", "pages_sharing", "ksm_zero_pages")
_VERDICT_CONTROLS = tuple(c.id for c in CONTROLS if c.id in HOST_RULES and c.fails_as)


@dataclass(frozen=True)
class Paths:
    """Where the script reads and writes; tests point them at a fake tree."""

    ksm_dir: str = KSM_DIR
    systemd_dir: str = SYSTEMD_DIR
    persist: str = PERSIST_PATH
    state: str = STATE_PATH


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _read_function(paths: Paths) -> str:
    """``read_host``: the fact's ksm, units and persist pieces, parsed into variables."""
    ksm_cases = "\n".join(f"      {name}) ksm_{name}=$value ;;" for name in _KSM_FILES)
    unit_cases = []
    for unit in UNITS:
        var = f"unit_{shell_name(unit)}"
        unit_cases.append(
            f"        {unit}) case $key in LoadState) {var}_load=$value ;;"
            f" ActiveState) {var}_active=$value ;; *) {var}_file=$value ;; esac ;;"
        )
    resets = "; ".join(
        [f"ksm_{name}=''" for name in _KSM_FILES]
        + [f"unit_{shell_name(u)}_{f}=''" for u in UNITS for f in ("load", "active", "file")]
    )
    return f"""\
read_host() {{
  {resets}
  ksm=1
  systemd=1
  page_size=$(getconf PAGESIZE)
  ksm_out=$({ksm_read(paths.ksm_dir)})
  while IFS= read -r line; do
    [ "$line" = absent ] && ksm=0 && continue
    name=${{line#"{paths.ksm_dir}"/}}
    value=${{name#*:}}
    name=${{name%%:*}}
    case $name in
{ksm_cases}
    esac
  done <<EOF
$ksm_out
EOF
  units_out=$({units_read(paths.systemd_dir)})
  unit=
  while IFS='=' read -r key value; do
    case $key in
      no-systemd) systemd=0 ;;
      Id) unit=$value ;;
      LoadState | ActiveState | UnitFileState)
        case $unit in
{chr(10).join(unit_cases)}
        esac ;;
    esac
  done <<EOF
$units_out
EOF
  persist=$({persist_read(paths.persist)})
}}
"""


def _judge_function() -> str:
    """``judge``: ``passed_<control>`` (1, 0, or empty when skipped) and ``compliant``."""
    lines = ["judge() {"]
    for control, rule in HOST_RULES.items():
        var = f"passed_{shell_name(control)}"
        test = f"if {rule.condition.shell()}; then {var}=0; else {var}=1; fi"
        if rule.needs_ksm:
            test = f'if [ "$ksm" = 0 ]; then {var}=; el{test}'
        lines.append(f"  {test}")
    lines.append("  compliant=1")
    for control in _VERDICT_CONTROLS:
        lines.append(f'  [ "$passed_{shell_name(control)}" = 1 ] || compliant=0')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _heal_function(paths: Paths) -> str:
    """
    ``heal``: undo what the healable rules found: the units stopped and disabled first, then
    ``run`` read again (a ksmtuned running until then may have written 1 since the first read;
    seen on the test VMs) and 0 written when it merges (never 2: an unmerge needs its
    preflight).
    """
    conditions = [rule.condition for rule in HOST_RULES.values()]
    lines = ["heal() {"]
    for condition in conditions:
        if isinstance(condition, UnitOn):
            for unit in condition.units:
                enabled = UnitOn((unit,), condition.unit_files, ())
                active = UnitOn((unit,), (), condition.active)
                lines.append(f"  if {enabled.unit_shell(unit)}; then systemctl disable {unit}; fi")
                lines.append(f"  if {active.unit_shell(unit)}; then systemctl stop {unit}; fi")
    lines.append("  read_host")
    for condition in conditions:
        if isinstance(condition, KsmBits):
            lines.append(
                f'  if {condition.shell()}; then echo 0 > "{paths.ksm_dir}/{condition.name}"; fi'
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _drift_test() -> str:
    """Whether a healable rule fails (merged pages need an unmerge, and its preflight)."""
    healable = [
        f'[ "$passed_{shell_name(control)}" = 0 ]'
        for control, rule in HOST_RULES.items()
        if isinstance(rule.condition, KsmBits | UnitOn)
    ]
    return " || ".join(healable)


def _summary_function() -> str:
    units = " ".join(
        f"{unit}=${{unit_{shell_name(unit)}_file:-absent}}/${{unit_{shell_name(unit)}_active:-}}"
        for unit in UNITS
    )
    return f'summary() {{\n  echo "run=${{ksm_run:-absent}} {units}"\n}}\n'


def _metric(name: str, samples: list[str], when: str | None = None) -> list[str]:
    """Shell lines printing one metric's HELP, TYPE and samples (``when``: only if it holds)."""
    help_text, kind = {**METRICS, **WATCH_METRICS}[name]
    body = [
        f"printf '%s\\n' {_q(f'# HELP {name} {help_text}')} {_q(f'# TYPE {name} {kind}')}",
        *samples,
    ]
    if when is None:
        return body
    return [f"if {when}; then", *(f"  {line}" for line in body), "fi"]


def _sample(name: str, value: str, **labels: str) -> str:
    """A printf of one sample; ``value`` is shell text (a variable or an arithmetic expansion)."""
    extra = "".join(f',{key}="{escape_label(text)}"' for key, text in labels.items())
    return f'printf \'{name}{{%s{_printf_escape(extra)}}} %s\\n\' "$labels" "{value}"'


def _printf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "%%").replace("'", "'\\''")


def _metrics_function() -> str:
    """``metrics``: the exposition text, in ``-o prometheus``'s order, then the watch's own."""
    controls = []
    for control, rule in HOST_RULES.items():
        var = f"passed_{shell_name(control)}"
        line = _sample("ksm_guard_control_passed", f"${var}", control=control)
        controls.append(f'[ -z "${var}" ] || {line}' if rule.needs_ksm else line)
    units = [
        _sample(
            "ksm_guard_unit_active",
            f"$(if {UnitOn((unit,), (), ACTIVE_STATES).unit_shell(unit)}; then echo 1; "
            "else echo 0; fi)",
            unit=unit,
        )
        for unit in UNITS
    ]
    saved = "$(( (${ksm_pages_sharing:-0} + ${ksm_ksm_zero_pages:-0}) * page_size ))"
    body = [
        *_metric("ksm_guard_up", [_sample("ksm_guard_up", "1")]),
        *_metric("ksm_guard_run", [_sample("ksm_guard_run", "$ksm_run")], '[ "$ksm" = 1 ]'),
        *_metric(
            "ksm_guard_pages_sharing",
            [_sample("ksm_guard_pages_sharing", "${ksm_pages_sharing:-0}")],
        ),
        *_metric("ksm_guard_saved_bytes", [_sample("ksm_guard_saved_bytes", saved)]),
        *_metric("ksm_guard_compliant", [_sample("ksm_guard_compliant", "$compliant")]),
        *_metric("ksm_guard_unit_active", units, '[ "$systemd" = 1 ]'),
        *_metric("ksm_guard_control_passed", controls),
        *_metric("ksm_guard_waived", [_sample("ksm_guard_waived", "0")]),
        *_metric(
            "ksm_guard_watch_last_run_timestamp_seconds",
            [_sample("ksm_guard_watch_last_run_timestamp_seconds", "$now")],
        ),
        *_metric("ksm_guard_watch_heals_total", [_sample("ksm_guard_watch_heals_total", "$heals")]),
    ]
    return "metrics() {\n" + "".join(f"  {line}\n" for line in body) + "}\n"


def script(config: WatchConfig, paths: Paths = Paths()) -> str:
    """The watch's POSIX sh script for a host with ``config``."""
    labels = f'host="{escape_label(config.host)}"'
    textfile = f"{config.textfile_dir}/{TEXTFILE_NAME}"
    return f"""\
#!/bin/sh
# ksm-guard drift watch: judges this host by ksm-guard's host policy and writes its metrics for
# node_exporter's textfile collector. Made by ksm-guard; `ksm-guard enable` removes it.
set -u
labels={_q(labels)}
textfile_dir={_q(config.textfile_dir)}
state_file={_q(paths.state)}
interval={_q(config.interval)}
heal={1 if config.heal else 0}

{_read_function(paths)}
{_judge_function()}
{_heal_function(paths)}
{_summary_function()}
{_metrics_function()}
heals=0
if [ -r "$state_file" ]; then
  heals=$(sed -n 's/^heals=//p' "$state_file")
  heals=${{heals:-0}}
fi
read_host
judge
if [ "$heal" = 1 ] && {{ {_drift_test()}; }}; then
  before=$(summary)
  heal
  read_host
  judge
  heals=$((heals + 1))
  logger -t ksm-guard-watch -p daemon.warning \\
    "KSM drift healed (run=0, units stopped and disabled): before $before; after $(summary)"
fi
now=$(date +%s)

mkdir -p "$textfile_dir" "$(dirname "$state_file")" || exit 1
# Stopped mid-write (systemctl stop, as `enable` does): leave no temp file behind.
tmp='' state_tmp=''
stopped() {{ rm -f "$tmp" "$state_tmp"; exit "$1"; }}
trap 'stopped 129' HUP
trap 'stopped 130' INT
trap 'stopped 143' TERM
tmp=$(mktemp "$textfile_dir/.{TEXTFILE_NAME}.XXXXXX") || exit 1
if ! {{ metrics > "$tmp" && chmod 644 "$tmp" && mv -f "$tmp" {_q(textfile)}; }}; then
  rm -f "$tmp"
  exit 1
fi
state_tmp=$(mktemp "$state_file.XXXXXX") || exit 1
printf 'last_run=%s\\nheals=%s\\ninterval=%s\\ntextfile=%s\\n' \\
  "$now" "$heals" "$interval" {_q(textfile)} > "$state_tmp" &&
  chmod 644 "$state_tmp" && mv -f "$state_tmp" "$state_file"
"""


def service_unit(config: WatchConfig) -> str:
    """``ksm-guard-watch.service``: one run of the script."""
    return f"""\
[Unit]
Description=ksm-guard drift watch: KSM state to node_exporter metrics ({config.describe()})
Documentation=https://github.com/ksm-guard/ksm-guard#drift-watch

[Service]
Type=oneshot
ExecStart={SCRIPT_PATH}
"""


def timer_unit(config: WatchConfig) -> str:
    """``ksm-guard-watch.timer``: at boot, then every ``interval`` seconds."""
    return f"""\
[Unit]
Description=Run the ksm-guard drift watch every {config.interval} s and at boot

[Timer]
OnBootSec=30
OnUnitActiveSec={config.interval}
Unit={SERVICE}

[Install]
WantedBy=timers.target
"""


def watch_files(config: WatchConfig) -> dict[str, str]:
    """Each watch file's path and content."""
    return {
        SCRIPT_PATH: script(config),
        SERVICE_PATH: service_unit(config),
        TIMER_PATH: timer_unit(config),
    }
