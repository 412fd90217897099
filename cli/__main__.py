"""``python -m cli`` runs ksm-guard."""

from .main import main

main()
