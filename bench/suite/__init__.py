"""`microbatch bench`: the model ceiling, the HTTP ceiling (the echo server) and the server, run
as subprocesses and measured in interleaved rounds; the summary turns them into tables.

CLI process (the runner) plus the servers it starts; the echo server is also the generator's
test target. Built on bench/loadgen for the measurements that wrk does not make.
"""
