"""The tooling that measures microbatch from outside: the load generator (`microbatch loadtest`),
the benchmark suite (`microbatch bench`) and the device comparison (`microbatch compare`).

Runs in the CLI process and in the generator processes it spawns, never in a server: server/
does not import this package (server/cli.py loads a command's module only when it is chosen).
It talks HTTP through client/'s transport, like any other client of the server.
"""
