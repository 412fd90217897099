"""The engine's own pieces: where it must reach into pyinfra, and how it reads failures."""

from __future__ import annotations

import getpass

import pytest

from ksm_guard.cli.engine import SudoPasswordRequired, no_password_prompt, stderr_reason


def test_pyinfra_still_asks_for_sudo_passwords_through_getpass() -> None:
    """no_password_prompt swaps pyinfra's getpass: this fails when pyinfra stops using it."""
    import pyinfra.connectors.util as connector_util

    assert connector_util.getpass is getpass.getpass
    code = connector_util.execute_command_with_sudo_retry.__code__
    assert "getpass" in code.co_names


def test_off_a_terminal_a_sudo_password_prompt_fails_the_host() -> None:
    """Inside no_password_prompt (pytest's stdin is no terminal) pyinfra's prompt raises."""
    import pyinfra.connectors.util as connector_util

    with no_password_prompt(), pytest.raises(SudoPasswordRequired, match="no terminal"):
        connector_util.getpass("sudo password: ")
    assert connector_util.getpass is getpass.getpass


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            ["Could not chdir to home directory /nonexistent: No such file", "sudo: a password is "
             "required"],
            "permission denied: sudo: a password is required",
        ),
        (
            ["Could not chdir to home directory /home/x: Permission denied",
             "sh: 1: cannot create /sys/kernel/mm/ksm/run: Permission denied"],
            "sh: 1: cannot create /sys/kernel/mm/ksm/run: Permission denied",
        ),
        (["Could not chdir to home directory /x"], None),
    ],
)  # fmt: skip
def test_the_reason_is_the_telling_stderr_line(lines: list[str], reason: str | None) -> None:
    """A failed host's detail is what failed, not the shell's home-directory grumble."""
    assert stderr_reason(lines) == reason


@pytest.mark.parametrize("name", ["operations", "cli"])
def test_the_clone_folders_load_only_under_ksm_guard(name: str) -> None:
    """Importing operations/ or cli/ by the folder's own name is refused, saying which name."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert f"as ksm_guard.{name}, not as {name}" in result.stderr
