"""ksm-guard's command line: import it as ``ksm_guard.cli``."""

if __name__ != "ksm_guard.cli":  # the clone's top-level folder, imported by its own name
    raise ImportError(
        f"import ksm-guard's command line as ksm_guard.cli, not as {__name__}: "
        "the same classes under two names would not compare equal"
    )

from .. import __version__

__all__ = ["__version__"]
