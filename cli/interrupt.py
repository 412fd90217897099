"""Ctrl-C during a run: one line on stderr and exit code 130, whichever greenlet it lands in."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import NoReturn

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
MESSAGE = "ksm-guard: interrupted"
_saying = [MESSAGE]  # what a Ctrl-C says now: the last entry
GRACE_SECONDS = 1.0  # for the run's own clean-up (finally blocks) after a Ctrl-C


class Interrupted(BaseException):
    """
    Ctrl-C, raised in the main greenlet only. Not a KeyboardInterrupt: click would print
    "Aborted!" for it at a prompt, and gevent prints a KeyboardInterrupt's traceback from
    whichever greenlet or hub callback was running when the signal arrived.
    """


@contextmanager
def saying(message: str) -> Iterator[None]:
    """While the block runs, a Ctrl-C says ``message`` instead (e.g. at the prompt)."""
    _saying.append(message)
    try:
        yield
    except Interrupted:
        raise  # the Ctrl-C that leaves the block still says the block's message
    except BaseException:
        _saying.remove(message)
        raise
    _saying.remove(message)


def install() -> None:
    """
    Make SIGINT raise ``Interrupted`` in the main greenlet, leaving after ``GRACE_SECONDS``
    whatever the clean-up is waiting for; a second SIGINT leaves at once.
    """
    signal.signal(signal.SIGINT, _on_sigint)


def leave() -> NoReturn:
    """
    Say so on one line and exit 130 now, skipping the interpreter's shutdown: greenlets
    abandoned mid-connect (paramiko transports) and resolver threads would log their own ends
    during it. The run's ``finally`` blocks have executed by then, or had their moment.
    """
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe, a closed stream: nothing to save
            stream.flush()
    os.write(2, f"{_saying[-1]}\n".encode())
    os._exit(EXIT_INTERRUPTED)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, _leave_now)  # a second Ctrl-C: the unwinding is too slow
    if "gevent" not in sys.modules:
        raise Interrupted
    import gevent

    # The unwinding may wait on work that never ends (pyinfra's disconnect_all waits for a
    # slot in a pool full of hung commands): it gets a moment, then the process leaves anyway.
    gevent.spawn_later(GRACE_SECONDS, leave)
    main = _main_greenlet()
    if main is None:
        raise Interrupted
    # Python runs the handler in whichever greenlet is executing: often gevent's hub, else a
    # pool greenlet or a paramiko transport, whose exceptions are printed and go nowhere.
    gevent.kill(main, Interrupted)  # thrown where the main greenlet waits, on the next loop


def _leave_now(signum: int, frame: FrameType | None) -> None:
    leave()


def _main_greenlet() -> object | None:
    """The main greenlet when another one is running, else None (raise right here)."""
    from greenlet import getcurrent

    current = getcurrent()
    root = current
    while root.parent is not None:
        root = root.parent
    return None if root is current else root
