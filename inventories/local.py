"""This machine, through pyinfra's embedded ``@local`` connector (the CLI's default)."""

local = ["@local"]
