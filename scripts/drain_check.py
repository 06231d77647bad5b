"""How many requests a drain drops: start `microbatch serve`, run keep-alive clients that back
off briefly after a 503, send SIGTERM, and count the requests that ended without an HTTP answer
(refused connections after the listener closed are not counted: they never reached the
server). `python scripts/drain_check.py [--runs 5] [--clients 48] [-- SERVE FLAGS...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen.drain_load import drain_under_load
from bench.suite.servers import MICROBATCH_READY, microbatch_argv, start_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("serve_flags", nargs="*", help="extra `microbatch serve` flags")
    args = parser.parse_args()
    worst = 0
    for run in range(1, args.runs + 1):
        server = start_server("microbatch", microbatch_argv(*args.serve_flags), MICROBATCH_READY)
        try:
            tally = asyncio.run(drain_under_load(server.url, server.process.pid, args.clients))
            code = server.process.wait(60)
        finally:
            server.stop()
        worst = max(worst, tally.errors)
        print(
            f"run {run}: transport errors {tally.errors} {dict(tally.transport_errors)}, "
            f"answers {dict(sorted(tally.answers.items()))}, clients stopped by a refused "
            f"connection {tally.refused}, exit code {code}",
            flush=True,
        )
    print(f"most transport errors in one run: {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
