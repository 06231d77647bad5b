"""Run a model in-process on a .npy file: `python scripts/inference.py --device cpu --input
data/sample1.npy`. The same as `microbatch infer`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
