"""The fleet benchmark of ksm-guard: N local SSH hosts, five contenders, one report."""
