"""The tooling's `microbatch` subcommands (loadtest, bench, compare): one module each, with
`register` and `run`, wired by server/cli.py.
"""
