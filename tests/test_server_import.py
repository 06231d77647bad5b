"""Import hygiene of the server: no module of server/, and not `microbatch serve`'s way through
the CLI, loads the tooling (the bench package) or what only the tooling needs (matplotlib,
rich, tqdm), nor Ray (only server/ray_serve/, the `ray` extra's package, imports it, and it is
left out of the walk); `microbatch --help` lists every command without loading any tooling either.
Checked in fresh interpreters, where sys.modules starts empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
TOOLING = ("bench", "matplotlib", "rich", "tqdm")

EVERY_SERVER_MODULE = """
import importlib, json, pkgutil, sys
import server
from server.cli import build_parser, chosen_command
argv = ["serve", "--port", "0"]
args = build_parser(chosen_command(argv)).parse_args(argv)
names = [m.name for m in pkgutil.walk_packages(server.__path__, "server.")]
names = [n for n in names if not n.startswith("server.ray_serve")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules), "run": args.run.__module__}))
"""

TOP_HELP = """
import json, sys
from server.cli import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print(json.dumps(sorted(sys.modules)))
"""


def python(program: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def tooling_in(modules: list[str]) -> list[str]:
    return [m for m in modules if m.partition(".")[0] in TOOLING]


def test_no_server_module_and_not_serve_loads_the_tooling() -> None:
    done = python(EVERY_SERVER_MODULE)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"server.lifecycle", "server.http.app", "server.commands.serve"} <= set(
        report["modules"]
    )
    assert report["run"] == "server.commands.serve"
    assert tooling_in(report["loaded"]) == []
    assert [m for m in report["loaded"] if m.partition(".")[0] == "ray"] == []


def test_the_top_help_lists_every_command_and_loads_no_tooling() -> None:
    done = python(TOP_HELP, COLUMNS="200")  # wide enough that no help line wraps
    assert done.returncode == 0, done.stderr
    help_text, _, modules = done.stdout.rpartition("\n[")
    for name, (_, help_line) in COMMANDS.items():
        assert any(line.split() == [name, *help_line.split()] for line in help_text.splitlines())
    assert tooling_in(json.loads("[" + modules)) == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_its_own_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: microbatch {name} ")
    assert out.count("--") >= 2  # its own flags are listed, not only --help


@pytest.mark.parametrize(
    ("absent", "argv", "says"),
    [
        # The server's container image leaves the bench package out.
        ("bench", ["bench", "--quick"], "microbatch bench: needs the tooling (the bench package)"),
        # rich comes with the bench extra, which `pip install microbatch` leaves out.
        ("rich", ["compare", "--model", "linear"], "microbatch compare: needs the bench extra"),
        (
            "rich",
            ["loadtest", "--url", "http://127.0.0.1:9", "--model", "m", "--rate", "5"],
            "microbatch loadtest: needs the bench extra: pip install 'microbatch[bench]'",
        ),
    ],
)
def test_a_tooling_command_says_what_to_install(absent: str, argv: list[str], says: str) -> None:
    # A None in sys.modules makes the import fail as it does where the package is not installed.
    program = f"import sys; sys.modules[{absent!r}] = None\nfrom server.cli import main\n"
    program += f"sys.exit(main({argv!r}))"
    done = python(program)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr
