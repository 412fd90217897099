"""
An example fleet: copy it, list your nodes, and keep SSH settings in ``group_data/prod.py``.

    pyinfra inventories/prod.py deploy.py --dry --data ksm_mode=disable
    ksm-guard audit -i inventories/prod.py

Hosts are grouped; ``group_data/<group>.py`` applies to a group and ``group_data/all.py``
to every host. A host's own data goes in a ``(name, {...})`` tuple.
"""

pve_cluster_a = [
    "pve-a1.example.net",
    "pve-a2.example.net",
    ("pve-a3.example.net", {"ssh_port": 2222}),
]

debian_kvm = [
    "kvm1.example.net",
]
