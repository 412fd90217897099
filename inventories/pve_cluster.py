"""
A Proxmox VE cluster, every node of it, read from one node's /etc/pve/.members (pve-cluster's
own membership): no node list to keep. Name one node, the seed:

    KSM_GUARD_PVE_SEED=pve1.example.net ksm-guard audit -i inventories/pve_cluster.py
    KSM_GUARD_PVE_SEED=pve1.example.net pyinfra inventories/pve_cluster.py deploy.py --dry
    pyinfra inventories/pve_cluster.py deploy.py --dry --data ksm_pve_seed=pve1.example.net

Nodes are named after their node names and reached at the address pve-cluster lists for them.
A node pve-cluster lists offline is in the inventory, unreachable with the reason; a node in no
cluster is a cluster of one. SSH settings (ssh_user, ssh_key, _sudo, ...) for every node, the
seed included, go in group_data/all.py or group_data/pve_cluster.py (this file's name), or on the
command line (--sudo, pyinfra's --user/--key/--data).
"""

from ksm_guard.cli.cluster import cluster_hosts

pve_cluster = cluster_hosts()
