"""A real server run from the ConfigMap of deploy/kubernetes/cpu.yaml (token included) answers
what the pods' probes ask, without the token, as a kubelet asks; keeps /metrics behind the
token, as the PodMonitor sends it; and exports every metric name (with its labels) that a
manifest, the prometheus-adapter rule or docs/deploy.md names.

Test process; one server process on 127.0.0.1 (tests/server_process.py), host and port, the
token file and the worker count overridden through MICROBATCH_* variables as an operator would.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import request, tensor
from tests.deploy_manifests import DEPLOY, METRIC_NAME, ROOT, workloads
from tests.server_process import ServerProcess, start_server

TOKEN = "deploy-test-token-" + "0" * 40
# Labels that Prometheus adds to every scraped series (the PodMonitor's target labels).
TARGET_LABELS = frozenset(("namespace", "pod", "container", "job", "instance", "endpoint"))
SELECTOR = re.compile(r"\b(microbatch_[a-z0-9_]+)\{([^}]*)\}")
MANIFEST_FILES = sorted(DEPLOY.glob("*/*.yaml"))


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("pod")
    cpu = next(w for w in workloads() if w.resource.path.name == "cpu.yaml")
    config = folder / "microbatch.toml"
    config.write_text(cpu.config_text())
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    env = {
        "MICROBATCH_SERVER_HOST": "127.0.0.1",  # tests talk to loopback only
        "MICROBATCH_SERVER_AUTH_TOKEN_FILE": str(token),
        "MICROBATCH_WORKERS_CPU_WORKERS": "1",  # this machine has 2 cores, the pod 4
    }
    # start_server waits for /readyz = 200 without a token, as the startup probe does.
    with start_server("--config", str(config), env=env) as server:
        assert server.process.poll() is None, server.log()
        yield server


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_every_probe_is_answered_without_the_token(pod: ServerProcess) -> None:
    paths = {
        w.container[probe]["httpGet"]["path"]
        for w in workloads()
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {"/readyz", "/healthz"}
    for path in sorted(paths):
        status, _, _ = request(pod.url, "GET", path)
        assert status == 200, path
    assert request(pod.url, "GET", "/v1/models")[0] == 401  # the rest needs the token


def test_metrics_need_the_token_the_pod_monitor_sends(pod: ServerProcess) -> None:
    assert request(pod.url, "GET", "/metrics")[0] == 401
    assert request(pod.url, "GET", "/metrics", headers=auth())[0] == 200


def exported(pod: ServerProcess) -> dict[str, set[str]]:
    """Series name -> its label names, after one request to every model (histograms have
    series only once something was observed)."""
    for model, width in (("linear", 10), ("mlp", 256)):
        payload = {"inputs": {"x": tensor(np.ones(width, np.float32))}}
        status, _, _ = request(
            pod.url,
            "POST",
            f"/v1/models/{model}/infer",
            msgpack.packb(payload),
            "application/msgpack",
            headers=auth(),
        )
        assert status == 200, model
    text = request(pod.url, "GET", "/metrics", headers=auth())[2].decode()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_every_metric_a_manifest_or_the_guide_names_is_exported(pod: ServerProcess) -> None:
    series = exported(pod)
    in_manifests = {n for f in MANIFEST_FILES for n in METRIC_NAME.findall(f.read_text())}
    assert "microbatch_queue_depth" in in_manifests  # what the autoscalers use
    missing = sorted(in_manifests - set(series))
    assert not missing, f"not exported by /metrics: {missing}"
    # The guide may name a histogram or counter by its family too.
    families = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in series}
    guide = set(METRIC_NAME.findall((ROOT / "docs" / "deploy.md").read_text()))
    assert guide, "docs/deploy.md names no metric"
    assert not sorted(guide - set(series) - families)


def test_every_label_a_query_selects_on_exists(pod: ServerProcess) -> None:
    series = exported(pod)
    texts = [f.read_text() for f in MANIFEST_FILES]
    texts.append((ROOT / "docs" / "deploy.md").read_text())
    selectors = [m for text in texts for m in SELECTOR.findall(text)]
    assert selectors
    for name, matchers in selectors:
        labels = {m.split("=")[0].rstrip("!~ ").strip() for m in matchers.split(",") if m.strip()}
        unknown = labels - series[name] - TARGET_LABELS
        assert not unknown, f"{name}{{{matchers}}}: no label {sorted(unknown)}"
