"""
ksm-guard's pyinfra deploy: runs on every host the mode its data names.

    pyinfra inventories/prod.py deploy.py --dry                      # audit (the default)
    pyinfra inventories/prod.py deploy.py --data ksm_mode=disable    # units off, run=0, persisted
    pyinfra inventories/prod.py deploy.py --data ksm_mode=unmerge    # disable + run=2, preflighted
    pyinfra inventories/prod.py deploy.py --data ksm_mode=enable     # roll back
    pyinfra inventories/prod.py deploy.py --data ksm_mode=vm-optout  # Proxmox VE: allow-ksm 0

Options (host data, or --data): ksm_mask=true, ksm_force=true, ksm_max_fraction=0.5,
ksm_vmids=100,101 (vm-optout: only these VMs).
"""

from ksm_guard.operations import modes

modes.run_from_host_data()
