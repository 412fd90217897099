"""Operation tests in pyinfra's style: one scenario per file in tests/operations/<module>.<op>/."""

from pathlib import Path

from pyinfra_testing.operations import make_operation_tests

OPERATIONS = Path(__file__).parent / "operations"

for folder in sorted(OPERATIONS.iterdir()):
    _case = make_operation_tests("ksm_guard.operations", folder.name, folder)
    globals()[f"Test_{folder.name.replace('.', '_')}"] = _case

del _case
