"""Drive load at a running server and report throughput and latency: `python scripts/loadtest.py
--url http://127.0.0.1:8000 --model mlp --rate 200 --duration 10`. The same as
`microbatch loadtest`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.cli import main

if __name__ == "__main__":
    sys.exit(main(["loadtest", *sys.argv[1:]]))
