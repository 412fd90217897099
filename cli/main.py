"""Console entry point: make pyinfra's greenlets truly parallel, then run the typer app."""

from __future__ import annotations

import gc
import sys

from . import interrupt


def main() -> None:
    """Run ``ksm-guard``; gevent patches the standard library first, as pyinfra's own CLI does."""
    interrupt.install()  # first: a Ctrl-C while gevent and pyinfra load is one line as well
    try:
        if not {"--help", "-h", "--version"} & set(sys.argv[1:]) and len(sys.argv) > 1:
            from gevent import monkey

            monkey.patch_all()
        from .app import app

        app()
    except interrupt.Interrupted:
        interrupt.leave()
    finally:
        # All is written and closed: spare the exit a collector pass over pyinfra's objects.
        gc.freeze()
