"""``python -m ksm_guard.cli`` runs ksm-guard."""

from .main import main

main()
