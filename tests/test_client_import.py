"""Import hygiene of the client: importing it (and using it up to a request) loads neither torch
nor aiohttp's server parts (nor the tooling). Checked in a fresh interpreter, where sys.modules
starts empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import importlib, json, pkgutil, sys
import client
from client import Client
import server.commands.remote
for module in pkgutil.walk_packages(client.__path__, "client."):
    importlib.import_module(module.name)  # every module of the client, not only its front
imported = sorted(sys.modules)
with Client("unix:///nonexistent/microbatch.sock", retry=None, timeout_s=5) as mb:
    ready = mb.ready()  # a real attempt: aiohttp's client is loaded by now
print(json.dumps({"imported": imported, "after_use": sorted(sys.modules), "ready": ready}))
"""


def test_importing_and_using_the_client_loads_neither_torch_nor_aiohttp_web() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ready"] is False
    for modules in (report["imported"], report["after_use"]):
        assert "torch" not in modules
        assert not [m for m in modules if m.partition(".")[0] in ("bench", "rich", "matplotlib")]
        assert not [m for m in modules if m == "aiohttp.web" or m.startswith("aiohttp.web_")]
    # aiohttp costs more to import than the rest of the client: it loads on first use only.
    assert "aiohttp" not in report["imported"]
    assert "aiohttp.client" in report["after_use"]
