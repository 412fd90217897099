"""ksm-guard's testinfra compliance checks, shipped with the tool (``ksm-guard verify``)."""
