"""Every resource under deploy/ validates: the built-in kinds with kubernetes-validate, strict,
for each Kubernetes version from 1.29 to the newest it bundles; the custom resources (KEDA,
KServe, the Prometheus operator) with check-jsonschema against the vendored schemas of their
CRDs. A misspelt field fails both, so that these checks can fail.

Test process only: files and the two validators' own code, no cluster.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from kubernetes_validate.utils import SchemaNotFoundError, all_versions, latest_version
from packaging.version import Version

from tests.deploy_manifests import CRD_SCHEMAS, SCHEMAS, Resource, resources

OLDEST = Version("1.29")
VERSIONS = sorted({v for v in all_versions() if Version(v) >= OLDEST}, key=Version)
BUILTIN = [r for r in resources() if (r.doc["apiVersion"], r.kind) not in CRD_SCHEMAS]
CUSTOM = [r for r in resources() if (r.doc["apiVersion"], r.kind) in CRD_SCHEMAS]


def check_jsonschema(schema: Path, instance: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), str(instance)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_versions_run_from_1_29_to_the_newest_bundled() -> None:
    assert VERSIONS[0] == "1.29.0"
    assert VERSIONS[-1] == latest_version()
    assert len(VERSIONS) == Version(latest_version()).minor - 29 + 1  # no minor skipped


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_resources_validate_strictly(version: str) -> None:
    failures = []
    for r in BUILTIN:
        try:
            kubernetes_validate.validate(r.doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{r}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_every_resource_is_checked_by_one_validator() -> None:
    kinds = {r.kind for r in BUILTIN}
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    assert "HorizontalPodAutoscaler" in kinds
    assert {r.kind for r in CUSTOM} == {"ScaledObject", "InferenceService", "PodMonitor"}
    for r in CUSTOM:  # kubernetes-validate only warns about these: check-jsonschema must run
        with pytest.raises(SchemaNotFoundError):
            kubernetes_validate.validate(r.doc, latest_version(), strict=True)


@pytest.mark.parametrize("res", CUSTOM, ids=str)
def test_custom_resources_validate_against_their_crd_schema(res: Resource) -> None:
    # check-jsonschema reads one YAML document per file: a custom resource has its file.
    assert [r for r in resources() if r.path == res.path] == [res]
    result = check_jsonschema(CRD_SCHEMAS[(res.doc["apiVersion"], res.kind)], res.path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_misspelt_field_fails_kubernetes_validate() -> None:
    deployment = copy.deepcopy(next(r.doc for r in BUILTIN if r.kind == "Deployment"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    for version in (VERSIONS[0], VERSIONS[-1]):
        with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
            kubernetes_validate.validate(deployment, version, strict=True)


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "resource.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("res", CUSTOM, ids=str)
def test_a_misspelt_field_fails_check_jsonschema(res: Resource, tmp_path: Path) -> None:
    schema = CRD_SCHEMAS[(res.doc["apiVersion"], res.kind)]
    assert check_jsonschema(schema, _write(tmp_path, res.doc)).returncode == 0
    doc = copy.deepcopy(res.doc)
    doc["spec"]["selectr"] = {}
    result = check_jsonschema(schema, _write(tmp_path, doc))
    assert result.returncode == 1 and "'selectr' was unexpected" in result.stdout


def test_keda_trigger_metadata_values_must_be_strings(tmp_path: Path) -> None:
    scaled = copy.deepcopy(next(r for r in CUSTOM if r.kind == "ScaledObject"))
    metadata = scaled.doc["spec"]["triggers"][0]["metadata"]
    metadata["threshold"] = float(metadata["threshold"])
    result = check_jsonschema(
        CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")], _write(tmp_path, scaled.doc)
    )
    assert result.returncode == 1 and "is not of type 'string'" in result.stdout


def test_vendored_schemas_are_valid_and_name_their_source() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    assert sorted(SCHEMAS.glob("*.json")) == sorted(set(CRD_SCHEMAS.values()))
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        commit = re.search(r"\(([0-9a-f]{40})\)", schema["$comment"])
        assert commit and "Apache-2.0" in schema["$comment"], path.name
        assert commit.group(1) in readme and path.name in readme
