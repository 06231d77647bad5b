"""What the schemas cannot see in deploy/: each workload's config loads and matches its pod
(ports, probes, token Secret, writable paths, CPUs), the shutdown arithmetic holds (grace
period > preStop sleep + drain_delay_s + drain_timeout_s + the executors' stop), the Services,
budget, monitors and autoscalers point at the pods, and gpu.yaml differs from cpu.yaml only
where a GPU needs it.

Test process only: reads the files, loads configs with server.config.load_config.
"""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from server.config import Flags, load_config
from server.executors.cpu_pool import CpuPool
from server.executors.cuda import CudaExecutor
from tests.deploy_manifests import (
    DEPLOY,
    ROOT,
    TOKEN_KEY,
    TOKEN_SECRET,
    Workload,
    load_workload_config,
    quantity_cpus,
    resource,
    resources,
    workloads,
)

WORKLOADS = workloads()
# A stop joins each executor's processes for its timeout, then kills and joins them for 1 s.
POOL_STOP_S = inspect.signature(CpuPool.stop).parameters["timeout_s"].default + 1.0
CUDA_STOP_S = inspect.signature(CudaExecutor.stop).parameters["timeout_s"].default + 1.0
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)


def test_there_are_the_three_workloads() -> None:
    names = sorted(str(w.resource.path.relative_to(DEPLOY)) for w in WORKLOADS)
    assert names == ["kserve/inferenceservice.yaml", "kubernetes/cpu.yaml", "kubernetes/gpu.yaml"]
    assert [w.gpu for w in WORKLOADS if w.resource.path.name == "gpu.yaml"] == [True]
    assert sum(w.gpu for w in WORKLOADS) == 1


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_config_loads_and_listens_where_the_pod_expects(w: Workload, tmp_path: Path) -> None:
    config = load_workload_config(w, tmp_path)
    assert config.server.host == "0.0.0.0" and config.server.uds is None
    ports = [p["containerPort"] for p in w.container["ports"]]
    assert ports == [config.server.port]
    probes = {k: w.container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert w.port(probe["httpGet"]["port"]) == config.server.port
        assert "httpHeaders" not in probe["httpGet"]  # no secret in a probe
    assert probes["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = probes["startupProbe"]
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s > config.workers.start_timeout_s  # the server's own error comes first


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_grace_period_covers_pre_stop_delay_drain_and_stop(w: Workload, tmp_path: Path) -> None:
    server = load_workload_config(w, tmp_path).server
    stop_s = POOL_STOP_S + (CUDA_STOP_S if w.gpu else 0.0)
    needed_s = w.pre_stop_sleep_s() + server.drain_delay_s + server.drain_timeout_s + stop_s
    assert w.pod["terminationGracePeriodSeconds"] > needed_s
    # The preStop sleep is the load balancers' delay here; drain_delay_s would add to it.
    assert w.pre_stop_sleep_s() >= 5 and server.drain_delay_s == 0


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_drain_outlasts_every_default_deadline(w: Workload, tmp_path: Path) -> None:
    config = load_workload_config(w, tmp_path)
    for model in config.models:  # a queued request is answered (or 504) by its deadline
        assert config.server.drain_timeout_s >= model.batching.timeout_ms / 1000, model.name


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_token_comes_from_the_secret(w: Workload) -> None:
    token_path = w.config_toml()["server"]["auth_token_file"]
    mount_path, volume = w.mount_of(token_path)
    secret = volume["secret"]
    assert secret["secretName"] == TOKEN_SECRET
    relative = str(Path(token_path).relative_to(mount_path))
    assert {"key": TOKEN_KEY, "path": relative} in secret["items"]
    assert secret["defaultMode"] == 0o440 and w.pod["securityContext"]["fsGroup"] == 10001
    assert "auth_token =" not in w.config_text() and "env" not in str(secret)
    # The walk-through creates exactly that Secret.
    command = f"create secret generic {TOKEN_SECRET} --from-literal={TOKEN_KEY}="
    assert command in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_a_non_root_read_only_container_has_its_writable_paths(w: Workload, tmp_path: Path) -> None:
    pod_security, security = w.pod["securityContext"], w.container["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    for path in ("/tmp", "/dev/shm"):
        assert "emptyDir" in w.mount_of(path)[1]
    assert w.mount_of("/dev/shm")[1]["emptyDir"]["medium"] == "Memory"
    home = {e["name"]: e["value"] for e in w.container["env"]}["HOME"]
    assert "emptyDir" in w.mount_of(home)[1]
    cache = load_workload_config(w, tmp_path).devices.resolved_calibration_cache()
    if cache is not None:  # measured costs are written there
        assert "emptyDir" in w.mount_of(cache)[1]
    config_mount = next(m for m in w.container["volumeMounts"] if m["name"] == "config")
    assert config_mount["readOnly"] is True


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_workers_fit_the_cpus(w: Workload, tmp_path: Path) -> None:
    workers = load_workload_config(w, tmp_path).workers
    resources_ = w.container["resources"]
    cpus = quantity_cpus(resources_["limits"]["cpu"])
    assert resources_["requests"] == resources_["limits"]  # Guaranteed: whole, pinnable CPUs
    assert cpus.is_integer() and workers.cpu_workers >= 1
    # One process per worker, the event loop, and with a GPU the CUDA executor's process.
    processes = workers.cpu_workers * workers.threads_per_worker + 1 + int(w.gpu)
    assert processes <= cpus


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_pod_keeps_kubernetes_variables_out(w: Workload) -> None:
    # Kubernetes would set MICROBATCH_SERVICE_HOST etc. for the Service named microbatch. The
    # server ignores those (it refuses other unknown MICROBATCH_* variables), but a Service
    # named like a settings table (microbatch-server) would collide: keep them out anyway.
    assert w.pod["enableServiceLinks"] is False
    assert w.pod["automountServiceAccountToken"] is False
    config = load_config(None, {"MICROBATCH_SERVICE_HOST": "10.0.0.1"}, Flags())
    assert config.server.port == 8000


@pytest.mark.parametrize("w", WORKLOADS, ids=str)
def test_the_image_and_the_command(w: Workload) -> None:
    assert VERSION
    variant = "cuda" if w.gpu else "cpu"
    assert w.container["image"].endswith(f"/microbatch:{VERSION.group(1)}-{variant}")
    assert w.container["args"][0] == "serve"
    if w.gpu:
        limits = w.container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= 1
        assert w.container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def test_gpu_yaml_differs_from_cpu_yaml_only_where_a_gpu_needs_it() -> None:
    cpu, gpu = (
        next(w for w in WORKLOADS if w.resource.path.name == n) for n in ("cpu.yaml", "gpu.yaml")
    )

    def without_gpu_parts(w: Workload) -> dict[str, Any]:
        doc = copy.deepcopy(w.resource.doc)
        pod = doc["spec"]["template"]["spec"]
        for key in ("terminationGracePeriodSeconds", "tolerations"):
            pod.pop(key, None)
        container = pod["containers"][0]
        for key in ("image", "resources", "startupProbe"):
            container.pop(key)
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "cache"]
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] not in ("cache", "dshm")]
        return doc

    assert without_gpu_parts(cpu) == without_gpu_parts(gpu)
    others = {
        f: [
            r.doc
            for r in resources()
            if r.path.name == f and r.kind not in ("Deployment", "ConfigMap")
        ]
        for f in ("cpu.yaml", "gpu.yaml")
    }
    assert others["cpu.yaml"] == others["gpu.yaml"]  # Services and the budget alike
    assert gpu.config_toml()["server"] == cpu.config_toml()["server"]
    assert gpu.config_toml()["batching"] == cpu.config_toml()["batching"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_budget_and_monitor_select_the_pods() -> None:
    for w in WORKLOADS:
        if w.resource.kind != "Deployment":
            continue
        namespace, near = w.resource.namespace, w.resource.path
        assert _selects(w.resource.doc["spec"]["selector"]["matchLabels"], w.labels)
        for name in ("microbatch", "microbatch-headless"):
            service = resource("Service", name, namespace, near).doc["spec"]
            assert _selects(service["selector"], w.labels)
            assert [w.port(p["targetPort"]) for p in service["ports"]] == [8080]
        assert (
            resource("Service", "microbatch-headless", namespace, near).doc["spec"]["clusterIP"]
            == "None"
        )
        budget = resource("PodDisruptionBudget", "microbatch", namespace, near).doc["spec"]
        assert _selects(budget["selector"]["matchLabels"], w.labels)
        monitor = resource("PodMonitor", "microbatch", namespace).doc["spec"]
        assert _selects(monitor["selector"]["matchLabels"], w.labels)
        endpoint = monitor["podMetricsEndpoints"][0]
        assert w.port(endpoint["port"]) == 8080 and endpoint["path"] == "/metrics"
        assert endpoint["authorization"]["credentials"] == {"name": TOKEN_SECRET, "key": TOKEN_KEY}
