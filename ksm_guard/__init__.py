"""
ksm-guard: find and shut off Kernel Samepage Merging (KSM) across a fleet, with proof.

One import name for everything: ``ksm_guard.operations`` (the pyinfra facts and operations a
deploy imports) and ``ksm_guard.cli`` (the ``ksm-guard`` command). In a clone the two live in
the repository's top-level ``operations/`` and ``cli/`` folders, which ``ksm_guard/`` links to;
the wheel puts them under ``ksm_guard/`` itself. Never import them as ``operations`` or ``cli``:
the same classes loaded under two names would not compare equal.
"""

__version__ = "0.1.0"
