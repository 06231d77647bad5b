#!/usr/bin/env bash
# The GPU check of microbatch, for a machine with a CUDA GPU: the CUDA tests, a short
# `microbatch compare`, and a short load through a real server; then a summary.
#
#   scripts/gpu_check.sh            (from anywhere; uses .venv/bin/python, or $PYTHON)
#
# Installs nothing and writes only under a temporary directory (kept, and named at the end).
# Every step has its own time limit; the whole check takes under 5 minutes. Exit status: 0 when
# every step passed, 1 when one failed, 3 when torch sees no CUDA GPU.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=$(mktemp -d "${TMPDIR:-/tmp}/microbatch-gpu-check.XXXXXX")
export MICROBATCH_DEVICES_CALIBRATION_CACHE="$OUT/calibration.json"  # measure afresh
RESULTS=()
FAILED=0

step() {  # step NAME LIMIT_S COMMAND...: run it with its output in $OUT/NAME.txt
    local name=$1 limit=$2 started=$SECONDS rc=0
    shift 2
    echo "== $name (up to ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        RESULTS+=("$name: ok ($((SECONDS - started)) s)")
    else
        RESULTS+=("$name: FAILED, exit $rc ($((SECONDS - started)) s), see $OUT/$name.txt")
        FAILED=1
    fi
}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "torch sees no CUDA GPU here; nothing to check"
    exit 3
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
    [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'

# 1. The CUDA tests, with the figures they print, and the executor tests that run anywhere.
step cuda_tests 150 "$PY" -m pytest -q -rA -s -p no:cacheprovider \
    tests/test_cuda.py tests/test_cuda_split.py tests/test_cuda_protocol.py

# 2. A short compare: CPU against GPU over the batch sizes, with a JSON report and a plot.
step compare 60 "$PY" -m server.cli compare --model mlp --batch-sizes 1,2,4,...,1024 \
    --repeats 5 --warmup 2 --json "$OUT/compare.json" --plot "$OUT/compare.png"

# 3. A short load through a real server: a shallow phase, then a deep one.
step load 80 "$PY" - "$OUT" <<'EOF'
"""Shallow: 200 single-sample requests one at a time. Deep: 32 clients, 1,200 requests of 32
samples. Counts where each phase's batches ran, against what the calibrated costs predict."""
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.conftest import infer_msgpack, request, tensor
from tests.server_process import start_server

out = sys.argv[1]
with start_server("--model", "mlp", timeout_s=60) as server:
    model = json.loads(request(server.url, "GET", "/v1/models")[2])["models"][0]
    costs = model["costs"]

    def expect(n: int) -> str:
        return min(costs, key=lambda d: costs[d]["fixed_ms"] + costs[d]["per_sample_ms"] * n)

    one = {"inputs": {"input": tensor(np.ones(256, np.float32))}}
    full = {"inputs": {"input": tensor(np.ones((32, 256), np.float32))}}
    phases = {}
    started = time.perf_counter()
    shallow = [infer_msgpack(server.url, "mlp", one) for _ in range(200)]
    phases["shallow"] = (shallow, time.perf_counter() - started, 1)
    started = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        deep = list(pool.map(lambda _: infer_msgpack(server.url, "mlp", full), range(1200)))
    phases["deep"] = (deep, time.perf_counter() - started, 32)
    summary = {"costs": costs, "crossover_batch_size": model["crossover_batch_size"]}
    for name, (answers, seconds, n) in phases.items():
        ok = [a for status, _, a in answers if status == 200]
        summary[name] = {
            "requests": len(answers),
            "ok": len(ok),
            "devices": dict(Counter(a["device"] for a in ok)),
            "expected_device_at_batch_%d" % n: expect(n),
            "batch_sizes": dict(Counter(a["batch_size"] for a in ok).most_common(5)),
            "samples_per_s": round(len(ok) * n / seconds),
        }
    metrics = request(server.url, "GET", "/metrics")[2].decode().splitlines()
    summary["metrics"] = [
        line for line in metrics
        if line.startswith(("microbatch_batches_total", "microbatch_cost_", "microbatch_batch_cap"))
    ]
    log = server.log()
WATCHED = ("server.routing", "server.executors.cuda", "server.executors.worker_link")
print(json.dumps(summary, indent=1))
print("\n".join(l for l in log.splitlines() if any(s in l for s in WATCHED)))
failures = [p for p in ("shallow", "deep") if summary[p]["ok"] != summary[p]["requests"]]
sys.exit(1 if failures else 0)
EOF

echo
echo "================ summary ================"
printf '%s\n' "${RESULTS[@]}"
echo
echo "-- CUDA tests"
grep -E "passed|failed|error|max error|^(PASSED|FAILED|SKIPPED|ERROR)" "$OUT/cuda_tests.txt" | tail -25
echo
echo "-- compare"
cat "$OUT/compare.txt"
echo
echo "-- load"
cat "$OUT/load.txt"
echo
echo "files: $OUT"
exit "$FAILED"
