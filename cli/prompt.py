"""
The yes/no prompt before a change, safe against a Ctrl-C at any instant.

``input()`` (what typer's and click's ``confirm`` read with) loses a Ctrl-C that lands between
the interpreter's last signal check and its ``read()`` system call: the handler is due, but the
read blocks until a line arrives (measured: about one run in 25 on a loaded 2-core machine hung
at the prompt). Here a terminal is waited on with ``select`` beside a signal wake-up pipe, so a
signal that arrives before the wait still ends it, and the handler runs as the wait returns.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable

YES = ("y", "yes")
NO = ("n", "no", "")  # an empty answer takes the default, which is no


def confirm(question: str, say: Callable[[str], None]) -> bool:
    """
    Ask ``question`` (default no) until the answer is yes or no; the end of input is no.

    + question: the text before `` [y/N]: ``
    + say: writes one diagnostic line (stderr)

    confirm("Apply 'disable' to 3 host(s)?", say=_err)
    """
    while True:
        sys.stderr.write(f"{question} [y/N]: ")
        sys.stderr.flush()
        line = _read_line()
        if line is None:
            sys.stderr.write("\n")
            return False
        answer = line.strip().lower()
        if answer in YES:
            return True
        if answer in NO:
            return False
        say("Error: invalid input")


def _read_line() -> str | None:
    """One line from stdin, or None at its end; a terminal is waited on interruptibly."""
    fd = _terminal_fd()
    if fd is None:
        line = sys.stdin.readline()
        return line or None
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    previous = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    try:
        while fd not in select.select([fd, wake_read], [], [])[0]:
            os.read(wake_read, 512)  # a signal whose handler returned: wait again
        data = os.read(fd, 4096)  # a canonical-mode terminal hands over one whole line
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_read)
        os.close(wake_write)
    return data.decode(errors="replace") or None


def _terminal_fd() -> int | None:
    """The file descriptor of stdin when it is a terminal, else None (a pipe, a test's buffer)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if os.isatty(fd) else None
