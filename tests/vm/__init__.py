"""Real-VM test harness for ksm-guard: Debian 12 guests under QEMU (see harness.py)."""
