"""Turns one version of a CustomResourceDefinition's openAPIV3Schema into a strict JSON Schema
(draft 2020-12), so that check-jsonschema can validate custom resources (KEDA, KServe, the
Prometheus operator) without a cluster. Run by hand to refresh deploy/schemas/ (its README says
how); imports nothing of the server.

Strict as `kubectl apply --validate=strict` is: an unknown field fails. What plain JSON Schema
cannot check (CEL `x-kubernetes-validations`, list-map keys) is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

DRAFT = "https://json-schema.org/draft/2020-12/schema"
# The same subtree (a container spec, a probe) repeats hundreds of times in KServe's CRD; one
# copy under $defs keeps the vendored file small. Smaller subtrees stay inline, readable.
_SHARE_AT_BYTES = 2048
_DROPPED = frozenset(("description", "x-kubernetes-validations", "x-kubernetes-list-map-keys"))
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def children(node: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of a schema node with `fn` applied to each subschema (never to a `properties`
    map itself, whose keys are field names such as "type")."""
    out = dict(node)
    if isinstance(node.get("properties"), dict):
        out["properties"] = {k: fn(v) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = fn(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(node.get(key), list):
            out[key] = [fn(item) for item in node[key]]
    return out


def strict_node(node: dict[str, Any]) -> dict[str, Any]:
    """One openAPIV3Schema node as JSON Schema, its subschemas converted first."""
    out = {k: v for k, v in children(node, strict_node).items() if k not in _DROPPED}
    if out.pop("x-kubernetes-int-or-string", False) and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("x-kubernetes-embedded-resource", False):
        # An embedded object (a pod template's own metadata): kind and apiVersion are allowed.
        props = out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    out.pop("x-kubernetes-list-type", None)
    out.pop("x-kubernetes-map-type", None)
    return out


def share_repeats(schema: dict[str, Any]) -> dict[str, Any]:
    """Moves every large subschema that occurs more than once into $defs, referenced by hash."""
    counts: dict[str, int] = {}

    def count(node: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(node, sort_keys=True)
        if len(text) >= _SHARE_AT_BYTES:
            counts[text] = counts.get(text, 0) + 1
        return children(node, count)

    count(schema)
    shared = {text for text, n in counts.items() if n > 1}
    defs: dict[str, Any] = {}

    def replace(node: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(node, sort_keys=True)
        if text not in shared:
            return children(node, replace)
        name = "s" + hashlib.sha256(text.encode()).hexdigest()[:12]
        if name not in defs:
            defs[name] = children(node, replace)
        return {"$ref": f"#/$defs/{name}"}

    out = children(schema, replace)
    if defs:
        out["$defs"] = dict(sorted(defs.items()))
    return out


def convert(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    """The JSON Schema of `version` of the CRD, with apiVersion and kind pinned."""
    spec = crd["spec"]
    served = [v for v in spec["versions"] if v["name"] == version]
    if not served:
        known = ", ".join(v["name"] for v in spec["versions"])
        raise SystemExit(f"{crd['metadata']['name']} has no version {version!r}; it has {known}")
    body = strict_node(served[0]["schema"]["openAPIV3Schema"])
    properties = body.setdefault("properties", {})
    properties["apiVersion"] = {"const": f"{spec['group']}/{version}"}
    properties["kind"] = {"const": spec["names"]["kind"]}
    properties["metadata"] = {**_OBJECT_META, "required": ["name"]}
    properties.pop("status", None)  # written by the controller, never by a manifest
    body["required"] = sorted({*body.get("required", ()), "apiVersion", "kind", "metadata"})
    body["additionalProperties"] = False
    return {"$schema": DRAFT, "$comment": source, **share_repeats(body)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path, help="the CRD YAML file")
    parser.add_argument("--version", required=True, help="the CRD version, e.g. v1alpha1")
    parser.add_argument("--source", required=True, help="provenance kept in $comment")
    args = parser.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(args.crd.read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise SystemExit(f"{args.crd}: expected one CustomResourceDefinition, found {len(crds)}")
    json.dump(convert(crds[0], args.version, args.source), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
