"""The KsmHost parser refuses garbage with a message naming the offending line."""

from pathlib import Path

import pytest
import yaml
from pyinfra.api.exceptions import FactProcessError

from ksm_guard.operations.facts import parse_ksm_host

GOOD = yaml.safe_load(
    (Path(__file__).parent / "facts/facts.KsmHost/debian12_ksmtuned_running.yaml").read_text()
)["output"]


def _with(old: str, new: str) -> list[str]:
    assert old in GOOD
    return [new if line == old else line for line in GOOD]


@pytest.mark.parametrize(
    ("output", "named"),
    [
        (_with("/sys/kernel/mm/ksm/run:1", "/sys/kernel/mm/ksm/run:on"), "run:on"),
        (_with("/sys/kernel/mm/ksm/pages_sharing:16320", "pages_sharing 16320"), "pages_sharing"),
        (_with("uid=0", "uid=root"), "uid=root"),
        (_with("MemTotal:        8010004 kB", "MemTotal: lots"), "MemTotal: lots"),
        (_with("LoadState=loaded", "Load=loaded"), "Load=loaded"),
        (_with("Id=ksm.service", "Id=sshd.service"), "sshd.service"),
        (_with("absent", "maybe"), "maybe"),
        (["bash: line 1: syntax error", *GOOD], "syntax error"),
        (_with("## units", "## services"), "## services"),
    ],
)
def test_garbage_raises_naming_the_line(output: list[str], named: str) -> None:
    """Each kind of garbage raises FactProcessError quoting the host's line."""
    with pytest.raises(FactProcessError, match=named):
        parse_ksm_host(output)


@pytest.mark.parametrize("run", [3, 7, 8, 12, -1])
def test_run_values_mm_ksm_never_shows_are_garbage(run: int) -> None:
    """run_store() takes 0-2 and the hot-remove notifier adds bit 4: anything else is refused."""
    with pytest.raises(FactProcessError, match=f"run:{run}"):
        parse_ksm_host(_with("/sys/kernel/mm/ksm/run:1", f"/sys/kernel/mm/ksm/run:{run}"))


@pytest.mark.parametrize("run", [0, 1, 2, 4, 5, 6])
def test_every_run_value_mm_ksm_shows_parses_raw(run: int) -> None:
    """0, 1, 2 and the same with the offline bit (4, 5, 6) are kept as the raw number."""
    ksm = parse_ksm_host(_with("/sys/kernel/mm/ksm/run:1", f"/sys/kernel/mm/ksm/run:{run}"))["ksm"]
    assert ksm is not None
    assert ksm["run"] == run


def test_missing_section_is_named() -> None:
    """Output cut short names the missing sections."""
    cut = GOOD[: GOOD.index("## units")]
    with pytest.raises(FactProcessError, match="units, persist"):
        parse_ksm_host(cut)


def test_advisor_mode_needs_one_bracketed_choice() -> None:
    """advisor_mode without a bracketed choice is garbage, not a silent default."""
    output = [*GOOD]
    output.insert(output.index("## units"), "/sys/kernel/mm/ksm/advisor_mode:none scan-time")
    with pytest.raises(FactProcessError, match="advisor_mode"):
        parse_ksm_host(output)


def test_advisor_mode_reads_the_bracketed_choice() -> None:
    """``none [scan-time]`` means the scan-time advisor is in force."""
    output = [*GOOD]
    output.insert(output.index("## units"), "/sys/kernel/mm/ksm/advisor_mode:none [scan-time]")
    ksm = parse_ksm_host(output)["ksm"]
    assert ksm is not None
    assert ksm["advisor_mode"] == "scan-time"


def test_an_added_section_leaves_captured_output_valid() -> None:
    """A new fact section: old output parses as before (no key); new output carries it."""
    from ksm_guard.operations.facts import Section, host_command

    probe = Section("probe", "uname -r", lambda lines: lines)
    assert "echo '## probe'; uname -r" in host_command((probe,))
    assert parse_ksm_host(GOOD, (probe,)) == parse_ksm_host(GOOD)
    assert "probe" not in parse_ksm_host(GOOD, (probe,))
    new = parse_ksm_host([*GOOD, "## probe", "6.12.48"], (probe,))
    assert new.get("probe") == ["6.12.48"]


def test_an_unknown_section_is_still_refused() -> None:
    """Only registered sections are accepted: a stray marker is garbage, not a new section."""
    with pytest.raises(FactProcessError, match="section marker"):
        parse_ksm_host([*GOOD, "## probe", "6.12.48"])
