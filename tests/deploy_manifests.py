"""What the deploy tests read: every Kubernetes resource under deploy/ as plain data, and each
workload (a Deployment, or KServe's predictor) with its main container, its mounts and the
microbatch TOML its ConfigMap holds.

Runs in the test process; reads files only (no cluster, no network, no server), and loads
configs with server.config.load_config.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from server.config import Config, Flags, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFEST_DIRS = (DEPLOY / "kubernetes", DEPLOY / "kserve")
SCHEMAS = DEPLOY / "schemas"
# Custom resources, validated with check-jsonschema against the vendored schema of their CRD.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda.sh_scaledobject_v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): (
        SCHEMAS / "serving.kserve.io_inferenceservice_v1beta1.json"
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): SCHEMAS
    / "monitoring.coreos.com_podmonitor_v1.json",
}
TOKEN_SECRET, TOKEN_KEY = "microbatch-auth", "token"


@dataclass(frozen=True)
class Resource:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.doc["metadata"].get("namespace", ""))

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}: {self.kind}/{self.name}"


@dataclass(frozen=True)
class Workload:
    """A pod spec that runs microbatch, with what it mounts."""

    resource: Resource
    pod: dict[str, Any]  # the pod spec (a Deployment's template, or KServe's predictor)
    labels: dict[str, str]  # the pod's labels, where the manifest sets them
    gpu: bool

    def __str__(self) -> str:
        return str(self.resource)

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1, f"{self.resource}: one container expected"
        return dict(containers[0])

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def mounts(self) -> dict[str, dict[str, Any]]:
        """Mount path -> the volume mounted there."""
        return {m["mountPath"]: self.volume(m["name"]) for m in self.container["volumeMounts"]}

    def mount_of(self, path: str) -> tuple[str, dict[str, Any]]:
        """The mount path holding `path`, and its volume."""
        target = PurePosixPath(path)
        for mount_path, volume in self.mounts().items():
            if target == PurePosixPath(mount_path) or PurePosixPath(mount_path) in target.parents:
                return mount_path, volume
        raise AssertionError(f"{self.resource}: nothing is mounted over {path}")

    def config_path(self) -> str:
        args = self.container["args"]
        return str(args[args.index("--config") + 1])

    def config_text(self) -> str:
        """The microbatch TOML that the container reads: from the ConfigMap mounted there."""
        path = self.config_path()
        mount_path, volume = self.mount_of(path)
        name, namespace = volume["configMap"]["name"], self.resource.namespace
        config_map = resource("ConfigMap", name, namespace, near=self.resource.path)
        key = str(PurePosixPath(path).relative_to(mount_path))
        return str(config_map.doc["data"][key])

    def config_toml(self) -> dict[str, Any]:
        return tomllib.loads(self.config_text())

    def port(self, ref: int | str) -> int:
        """A port as a probe or Service names it (a number, or a container port's name)."""
        if isinstance(ref, int):
            return ref
        return int(next(p["containerPort"] for p in self.container["ports"] if p["name"] == ref))

    def pre_stop_sleep_s(self) -> float:
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        return float(command[1])


@cache
def resources() -> tuple[Resource, ...]:
    out = []
    for folder in MANIFEST_DIRS:
        for path in sorted(folder.glob("*.yaml")):
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            out += [Resource(path, doc) for doc in docs]
    return tuple(out)


def resource(kind: str, name: str, namespace: str, near: Path | None = None) -> Resource:
    """The resource of that kind, name and namespace; the one in file `near` where that file
    has one (cpu.yaml and gpu.yaml each hold their own ConfigMap of the same name)."""
    found = [r for r in resources() if (r.kind, r.name, r.namespace) == (kind, name, namespace)]
    assert found, f"no {kind}/{name} in namespace {namespace!r} under deploy/"
    return next((r for r in found if r.path == near), found[0])


def workloads() -> list[Workload]:
    out = []
    for r in resources():
        if r.kind == "Deployment":
            template = r.doc["spec"]["template"]
            pod, labels = template["spec"], template["metadata"]["labels"]
        elif r.kind == "InferenceService":
            pod, labels = r.doc["spec"]["predictor"], {}
        else:
            continue
        limits = pod["containers"][0]["resources"]["limits"]
        out.append(Workload(r, pod, labels, gpu="nvidia.com/gpu" in limits))
    return out


def load_workload_config(workload: Workload, tmp_path: Path) -> Config:
    """The workload's config as the server builds it. The token file (a Secret in the pod) is
    a stand-in here, named the way an operator would override the setting."""
    path = tmp_path / "microbatch.toml"
    path.write_text(workload.config_text())
    token = tmp_path / "token"
    token.write_text("t" * 64)
    return load_config(str(path), {"MICROBATCH_SERVER_AUTH_TOKEN_FILE": str(token)}, Flags())


def quantity_cpus(text: str | int) -> float:
    """A CPU quantity ("4", "500m", 2) in CPUs."""
    value = str(text)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


METRIC_NAME = re.compile(r"\bmicrobatch_[a-z0-9_]+")
