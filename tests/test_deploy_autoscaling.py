"""The autoscalers and the KServe example agree with the workloads they scale: KEDA's
ScaledObject, the HPA (with its prometheus-adapter rule) and KServe's KEDA metric target the
right object, query the right namespace, aim at the same queue depth per pod, and scale before
the queue would refuse requests. Every resource sits in its folder's namespace.

Test process only: reads the files (the metric names are checked on a live server in
test_deploy_live.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_manifests import (
    DEPLOY,
    Resource,
    load_workload_config,
    resource,
    resources,
    workloads,
)

NAMESPACES = {"kubernetes": "microbatch", "kserve": "microbatch-kserve"}
ADAPTER = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())


def one(kind: str) -> Resource:
    found = [r for r in resources() if r.kind == kind]
    assert len(found) == 1, kind
    return found[0]


def namespace_in(query: str) -> str:
    found = re.findall(r'namespace="([^"]+)"', query)
    assert len(found) == 1, query
    return str(found[0])


def max_queue_sizes(tmp_path: Path) -> list[int]:
    configs = [load_workload_config(w, tmp_path) for w in workloads()]
    return [m.batching.max_queue_size for config in configs for m in config.models]


def test_every_resource_sits_in_its_folders_namespace() -> None:
    for r in resources():
        assert r.namespace == NAMESPACES[r.path.parent.name], str(r)


def test_keda_scales_the_deployment_on_its_own_namespace() -> None:
    scaled = one("ScaledObject")
    spec = scaled.doc["spec"]
    assert resource("Deployment", spec["scaleTargetRef"]["name"], scaled.namespace)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert namespace_in(trigger["metadata"]["query"]) == scaled.namespace
    assert "metricType" not in trigger  # AverageValue: the threshold is per pod
    assert spec["minReplicaCount"] >= 2  # the budget's maxUnavailable 1 leaves one serving


def test_the_hpa_scales_the_deployment_on_the_adapters_metric() -> None:
    hpa = one("HorizontalPodAutoscaler")
    spec = hpa.doc["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert resource("Deployment", target["name"], hpa.namespace)
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    exposed = [rule["name"]["as"] for rule in ADAPTER["rules"]["custom"]]
    assert metric["pods"]["metric"]["name"] in exposed
    for rule in ADAPTER["rules"]["custom"]:  # per pod and namespace, as a Pods metric needs
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
    assert spec["minReplicas"] == one("ScaledObject").doc["spec"]["minReplicaCount"]
    assert spec["maxReplicas"] == one("ScaledObject").doc["spec"]["maxReplicaCount"]
    keda_behavior = one("ScaledObject").doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert spec["behavior"] == keda_behavior["behavior"]


def _targets() -> dict[str, float]:
    keda = one("ScaledObject").doc["spec"]["triggers"][0]["metadata"]["threshold"]
    hpa = one("HorizontalPodAutoscaler").doc["spec"]["metrics"][0]["pods"]["target"]
    kserve = one("InferenceService").doc["spec"]["predictor"]["autoScaling"]["metrics"][0]
    return {
        "keda": float(keda),
        "hpa": float(hpa["averageValue"]),
        "kserve": float(kserve["external"]["target"]["value"]),
    }


def test_all_three_aim_at_the_same_depth_well_below_the_queue_limit(tmp_path: Path) -> None:
    targets = _targets()
    assert len(set(targets.values())) == 1, targets
    depth = targets["keda"]
    assert depth >= 1
    assert all(depth <= size / 8 for size in max_queue_sizes(tmp_path))  # scale, don't shed


def test_kserve_runs_microbatch_as_a_v2_custom_predictor() -> None:
    isvc = one("InferenceService")
    predictor: dict[str, Any] = isvc.doc["spec"]["predictor"]
    annotations = isvc.doc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's name for the predictor's own
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2"  # how KServe learns a custom container's protocol
    assert [p["containerPort"] for p in container["ports"]] == [8080]  # KServe's default port
    (metric,) = predictor["autoScaling"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["backend"] == "prometheus"
    assert namespace_in(metric["external"]["metric"]["query"]) == isvc.namespace
    monitor = resource("PodMonitor", "microbatch", isvc.namespace).doc["spec"]
    selector = monitor["selector"]["matchLabels"]
    assert selector == {"serving.kserve.io/inferenceservice": isvc.name}
    assert monitor["podMetricsEndpoints"][0]["port"] in [p["name"] for p in container["ports"]]


@pytest.mark.parametrize("kind", ["ScaledObject", "InferenceService"])
def test_the_prometheus_address_is_the_operators_service(kind: str) -> None:
    # Both read the Prometheus that the PodMonitors feed (the operator's prometheus-operated).
    text = yaml.safe_dump(one(kind).doc)
    assert "serverAddress: http://prometheus-operated.monitoring.svc:9090" in text
    assert ADAPTER["prometheus"]["url"] == "http://prometheus-operated.monitoring.svc"
