"""ksm-guard's command line."""

__version__ = "0.1.0"
