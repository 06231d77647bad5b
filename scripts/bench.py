"""Benchmark the server against the model ceiling and the HTTP ceiling: `python scripts/bench.py
--quick` (under 2 minutes) or without --quick for longer runs. The same as `microbatch bench`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
