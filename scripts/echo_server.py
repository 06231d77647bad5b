"""The HTTP ceiling: a bare aiohttp + uvloop server that decodes the msgpack body and answers
with it, no model, no batching. `python scripts/echo_server.py --port 8200` (see
bench/suite/echo_server.py for --delay-ms and --slots, which make it a test target)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.suite.echo_server import main

if __name__ == "__main__":
    sys.exit(main())
