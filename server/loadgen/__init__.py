"""The load generator (`microbatch loadtest`) and the benchmark suite (`microbatch bench`).

Pure modules (schedule, stats, report, markdown, bench_summary, wrk's output parser) hold the
numbers; thin ones do the I/O: driver (event loop), fanout (worker processes), progress
(stderr), plot (matplotlib), servers (subprocesses), model_loop (torch, in this process).
"""
