"""The server's import graph, read from the source (every import, at module level or inside a
function): no circles anywhere in server/; the worker contract imports neither side of the
process boundary, and neither side imports the other; the executors do not import routing;
and the contract and the workers' channel load no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXECUTORS = "server.executors."
# Event loop (main process) and worker processes; worker_entry.py names the workers' entry
# points for the spawn and belongs to neither; shm_layout.py and profiling.py serve both.
EVENT_LOOP = {"base", "cpu_pool", "cuda", "cuda_probe", "framing", "reaper", "staging"}
EVENT_LOOP |= {"watchdog", "worker_link"}
WORKERS = {"cpu_worker", "cuda_worker", "cuda_instance", "cuda_failure", "worker_channel"}
WORKERS |= {"worker_segment"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the server modules it imports."""
    modules = {}
    for path in (ROOT / "server").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with the path it takes back."""
    found = []
    for start in sorted(graph):
        paths = [[start]]
        seen = set()
        while paths:
            path = paths.pop()
            for nxt in sorted(graph[path[-1]]):
                if nxt == start:
                    found.append([*path, start])
                    paths.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append([*path, nxt])
    return found


def test_the_server_has_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_the_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"]]


def test_the_contract_stands_between_the_event_loop_and_the_workers() -> None:
    graph = import_graph()
    assert not {m for m in graph[EXECUTORS + "contract"] if m.startswith(EXECUTORS)}
    for side, other in ((EVENT_LOOP, WORKERS), (WORKERS, EVENT_LOOP)):
        for module in side:
            crossing = graph[EXECUTORS + module] & {EXECUTORS + m for m in other}
            assert not crossing, f"{module} imports {crossing}"
    known = EVENT_LOOP | WORKERS | {"contract", "worker_entry", "shm_layout", "profiling"}
    every = {m.removeprefix(EXECUTORS) for m in graph if m.startswith(EXECUTORS)}
    assert every == known  # a new module takes a side here


def test_the_executors_do_not_import_routing() -> None:
    for name, imported in import_graph().items():
        if name.startswith(EXECUTORS):
            assert not {m for m in imported if m.startswith("server.routing")}, name


def test_the_contract_and_the_workers_channel_load_no_torch() -> None:
    code = (
        "import sys, server.executors.contract, server.executors.worker_channel, "
        "server.executors.worker_entry; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "False"
