"""SSH and privilege settings for every host of inventories/prod.py (its file-name group)."""

# Log in as an unprivileged admin and use sudo: KSM's sysfs and systemctl need root.
ssh_user = "admin"
_sudo = True

# ksm-guard options, overridable per group or with --data:
ksm_mode = "audit"
ksm_mask = False  # also mask ksmtuned/ksm.service (survives package reinstalls)
ksm_max_fraction = 0.5  # refuse an unmerge needing more than this share of MemAvailable
