"""Fact tests in pyinfra's own style: one scenario per file under tests/facts/<module>.<Fact>/."""

from pathlib import Path

from pyinfra_testing.facts import make_fact_tests

FACTS = Path(__file__).parent / "facts"

for folder in sorted(FACTS.iterdir()):
    _case = make_fact_tests("ksm_guard.operations", folder.name, folder)
    globals()[_case.__name__] = _case

del _case
