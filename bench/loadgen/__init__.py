"""The load generator (`microbatch loadtest`): a plan of sends, driven open or closed loop from
one or several processes, and the report of what the server answered.

Pure modules (schedule, stats, report, markdown) hold the numbers; thin ones do the I/O:
target (the server's address and model listing), driver (event loop), fanout (worker
processes), progress (stderr), plot (matplotlib, imported only for --plot).
"""
