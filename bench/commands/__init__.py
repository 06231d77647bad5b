"""The tooling's `microbatch` subcommands (loadtest, bench, compare): one module each, with
DESCRIPTION, `add_arguments` and `run`; server/cli.py loads one only when it is chosen.
"""
