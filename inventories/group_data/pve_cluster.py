"""SSH and privilege settings for every node of inventories/pve_cluster.py, the seed included."""

# Proxmox VE nodes usually let root in with a key; else log in as an admin and use sudo
# (/etc/pve/.members, KSM's sysfs and systemctl need root):
# ssh_user = "admin"
# ssh_key = "~/.ssh/id_ed25519"
# _sudo = True

# The node the cluster's membership is read from, unless KSM_GUARD_PVE_SEED or
# --data ksm_pve_seed=... names one:
# ksm_pve_seed = "pve1.example.net"
