"""scripts/crd_to_jsonschema.py, run as a program on a small CRD: its JSON Schema pins the kind,
refuses unknown fields where Kubernetes would, and keeps what the CRD allows (int-or-string,
nullable, preserved unknown fields, a field named "type", shared repeated subschemas).

Test process; the script runs as a subprocess, as deploy/schemas/README.md says to run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.deploy_manifests import ROOT

# Big enough to be shared under $defs (the script shares repeats of 2 KB or more).
_BIG = {"type": "object", "properties": {f"field{i:03d}": {"type": "string"} for i in range(80)}}
_SPEC = {
    "type": "object",
    "required": ["size"],
    "properties": {
        "size": {"x-kubernetes-int-or-string": True},
        "note": {"type": "string", "nullable": True},
        "type": {"type": "string", "enum": ["a", "b"], "description": "a field named type"},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "first": _BIG,
        "second": _BIG,
    },
}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": _SPEC,
                            "status": {"type": "object"},
                        },
                    }
                },
            }
        ],
    },
}


def convert(crd: Path, version: str, source: str) -> subprocess.CompletedProcess[str]:
    """Runs the script on CRD, written to `crd`."""
    crd.write_text(yaml.safe_dump(CRD))
    script = "scripts/crd_to_jsonschema.py"
    argv = [sys.executable, script, str(crd), "--version", version, "--source", source]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def validator(tmp_path_factory: pytest.TempPathFactory) -> Draft202012Validator:
    crd = tmp_path_factory.mktemp("crd") / "widgets.yaml"
    source = "example/widgets v1.0.0 (" + "0" * 40 + "), Apache-2.0"
    result = convert(crd, "v1", source)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    assert schema["$comment"].startswith("example/widgets v1.0.0")
    assert len(schema["$defs"]) == 1  # first and second share one copy
    return Draft202012Validator(schema)


def widget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "labels": {"app": "x"}},
        "spec": {"size": 1, **spec},
    }


def errors(validator: Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [error.message for error in validator.iter_errors(doc)]


def test_what_the_crd_allows_validates(validator: Draft202012Validator) -> None:
    for doc in (
        widget(),
        widget(size="50%", note=None, type="a"),
        widget(free={"anything": [1, {"goes": True}]}, labels={"k": "v"}),
        widget(first={"field000": "x"}, second={"field079": "y"}),
    ):
        assert errors(validator, doc) == [], doc


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (widget(sise=1), "'sise' was unexpected"),
        (widget(type="c"), "is not one of ['a', 'b']"),
        (widget(size=1.5), "is not valid under any of the given schemas"),
        (widget(second={"field080": "z"}), "'field080' was unexpected"),  # inside $defs too
        (widget(labels={"k": 1}), "is not of type 'string'"),
        ({**widget(), "kind": "Gadget"}, "'Widget' was expected"),
        ({**widget(), "apiVersion": "example.com/v2"}, "'example.com/v1' was expected"),
        ({**widget(), "status": {}}, "'status' was unexpected"),
        ({**widget(), "metadata": {"name": "w", "label": {}}}, "'label' was unexpected"),
        ({"apiVersion": "example.com/v1", "kind": "Widget", "spec": {"size": 1}}, "'metadata'"),
    ],
)
def test_what_kubernetes_would_refuse_fails(
    validator: Draft202012Validator, doc: dict[str, Any], fragment: str
) -> None:
    assert any(fragment in message for message in errors(validator, doc)), errors(validator, doc)


def test_a_version_the_crd_lacks_is_named(tmp_path: Path) -> None:
    result = convert(tmp_path / "widgets.yaml", "v2", "x")
    assert result.returncode == 1
    assert "widgets.example.com has no version 'v2'; it has v1" in result.stderr
