"""ksm-guard's pyinfra facts and operations: import them as ``ksm_guard.operations``."""

if __name__ != "ksm_guard.operations":  # the clone's top-level folder, imported by its own name
    raise ImportError(
        f"import ksm-guard's operations as ksm_guard.operations, not as {__name__}: "
        "the same classes under two names would not compare equal"
    )
