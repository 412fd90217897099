"""The confirmation prompt on a real terminal (a pty): answers, end of input, signals."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
from typer.testing import CliRunner

from ksm_guard.cli import prompt

# The child: Ctrl-C exits 130 (as ksm-guard's own handler does); SIGUSR1 is caught and returns.
CHILD = """
import signal, sys
from ksm_guard.cli import prompt
def interrupted(*_): raise SystemExit(130)
signal.signal(signal.SIGINT, interrupted)
signal.signal(signal.SIGUSR1, lambda *_: None)
answer = prompt.confirm("Apply?", say=lambda line: print(line, file=sys.stderr))
print("ANSWER", answer, file=sys.stderr)
"""


class Terminal:
    """A child process on the slave side of a pty that is its controlling terminal."""

    def __init__(self) -> None:
        master, slave = os.openpty()

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        self.master = master
        self.seen = b""
        self.child = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal,
        )  # fmt: skip
        os.close(slave)

    def wait_for(self, text: bytes, count: int = 1) -> None:
        deadline = time.monotonic() + 30
        while self.seen.count(text) < count:
            assert time.monotonic() < deadline, self.seen.decode(errors="replace")
            if select.select([self.master], [], [], 1)[0]:
                self.seen += os.read(self.master, 4096)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self) -> tuple[int, str]:
        code = self.child.wait(timeout=30)
        with suppress(OSError):  # EIO once the child has gone: the rest has been read
            while select.select([self.master], [], [], 0.2)[0]:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.seen += chunk
        return code, self.seen.decode(errors="replace")


@contextmanager
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        if term.child.poll() is None:
            term.child.kill()
            term.child.wait()
        os.close(term.master)


@pytest.mark.parametrize(
    ("keys", "answer"),
    [(b"y\n", True), (b"YES\n", True), (b"n\n", False), (b"no\n", False), (b"\n", False)],
)
def test_an_answer_on_a_terminal_is_read(keys: bytes, answer: bool) -> None:
    """y/yes (any case) is yes; n/no and an empty answer (the default) are no."""
    with terminal() as term:
        term.wait_for(b"Apply? [y/N]: ")
        term.type(keys)
        code, output = term.finish()
    assert code == 0
    assert f"ANSWER {answer}" in output


def test_an_invalid_answer_asks_again() -> None:
    """Anything else: one error line, the question again, then the answer counts."""
    with terminal() as term:
        term.wait_for(b"[y/N]: ")
        term.type(b"maybe\n")
        term.wait_for(b"[y/N]: ", count=2)
        term.type(b"y\n")
        code, output = term.finish()
    assert code == 0
    assert "Error: invalid input" in output
    assert "ANSWER True" in output


def test_end_of_input_is_no() -> None:
    """Ctrl-D on an empty line ends the input: the answer is no, not an error."""
    with terminal() as term:
        term.wait_for(b"[y/N]: ")
        term.type(b"\x04")
        code, output = term.finish()
    assert code == 0
    assert "ANSWER False" in output


def test_a_signal_whose_handler_returns_keeps_the_prompt_waiting() -> None:
    """A signal that is handled (SIGUSR1 here) wakes the wait, which goes on to read the answer."""
    with terminal() as term:
        term.wait_for(b"[y/N]: ")
        for _ in range(3):
            term.child.send_signal(signal.SIGUSR1)
            time.sleep(0.1)
        assert term.child.poll() is None  # still asking
        term.type(b"yes\n")
        code, output = term.finish()
    assert code == 0
    assert "ANSWER True" in output


def test_ctrl_c_the_instant_the_question_shows_ends_the_prompt() -> None:
    """Ctrl-C as soon as the question is on screen, twenty times: each ends the wait (exit 130)."""
    for _ in range(20):
        with terminal() as term:
            term.wait_for(b"[y/N]")
            term.type(b"\x03")  # the terminal turns it into SIGINT for the foreground group
            code, output = term.finish()
        assert code == 130, output
        assert "ANSWER" not in output


def test_without_a_terminal_the_answer_is_read_from_stdin() -> None:
    """Piped input (a test's buffer): the same answers, end of input is no."""
    lines: list[str] = []
    runner = CliRunner()
    with runner.isolation(input="what\nyes\n"):
        assert prompt.confirm("Apply?", say=lines.append) is True
    with runner.isolation(input=""):
        assert prompt.confirm("Apply?", say=lines.append) is False
    assert lines == ["Error: invalid input"]
