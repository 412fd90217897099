"""Real-VM test harness for ksm-guard: Debian 12 and 13 guests under QEMU.

``recipe`` (what the images hold), ``cache`` (where builds are kept, keyed by the recipe),
``accel`` (KVM or TCG), ``qemu`` (processes and monitor), ``guest`` (one VM), ``session`` (a
set of VMs and their snapshots), ``inventory`` (pyinfra inventories); ``python -m tests.vm``.
"""
