"""Errors of the load generator and the bench: one base class, caught once by the commands.

Raised in the CLI process (never pickled across processes); bad flags raise ConfigError instead.
"""

from __future__ import annotations


class LoadGenError(RuntimeError):
    """The run cannot go on: the target is unreachable, the model unknown, an input unusable."""
