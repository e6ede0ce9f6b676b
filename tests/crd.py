"""Validate an object against a CRD's openAPIV3Schema the way the API server would on create, offline.

- Structure: the schema as JSON Schema, strict like `kubectl apply --validate=strict`: a field the schema does not
  declare is an error (the API server would silently prune it, which is worse), int-or-string and nullable as
  Kubernetes reads them.
- `x-kubernetes-list-type: map|set`: keys / items unique.
- CEL rules (`x-kubernetes-validations`): the ones these CRDs carry, each translated by hand below. A rule not in
  the table makes validation fail, so a schema update cannot add a rule the tests silently skip.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jsonschema

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load(name: str) -> dict:
    """A stored schema, e.g. load("trainer-v2.3.0/trainjobs")."""
    with gzip.open(os.path.join(DATA, f"{name}.schema.json.gz"), "rt") as f:
        return json.load(f)["openAPIV3Schema"]


def _json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _matches(pattern: str) -> Callable[[Any], bool]:
    return lambda v: re.search(pattern, v) is not None


# Each CEL rule of the stored CRDs, as Python on `self` (the value at the rule's node).
RULES: dict[str, Callable[[Any], bool] | None] = {
    "self == oldSelf": None,  # immutability: checked on update only
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda v: _matches(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")(v["metadata"]["name"]),
    "size(self.metadata.name) <= 63": lambda v: len(v["metadata"]["name"]) <= 63,
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')":
        lambda v: v == "" or _matches(r"^[A-Za-z][A-Za-z0-9+.-]*://.+$")(v),
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']":
        lambda v: v in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue"),
    "has(self.lastUpdatedTime)": lambda v: "lastUpdatedTime" in v,
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1":
        lambda v: sum(k in v for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1,
    "self >= 1": lambda v: v >= 1,
    "!self.exists(c, c == 'node')": lambda v: "node" not in v,
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))":
        lambda v: not ((v.get("startupPolicy") or {}).get("startupPolicyOrder") == "InOrder"
                       and any("dependsOn" in x for x in v.get("replicatedJobs", []))),
    "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)":
        lambda v: all(not (t.get("metadata") or {}).get("namespace") for t in v.get("templates", [])),
}


def _k8s_rules(value: Any, node: dict, path: str, errors: list[str]) -> None:
    for rule in node.get("x-kubernetes-validations", []):
        if rule["rule"] not in RULES:
            errors.append(f"{path}: CEL rule not translated in tests/crd.py: {rule['rule']}")
        elif RULES[rule["rule"]] is not None and not RULES[rule["rule"]](value):  # type: ignore[misc]
            errors.append(f"{path}: {rule.get('message') or rule['rule']}")
    if isinstance(value, list):
        kind = node.get("x-kubernetes-list-type")
        keys = [tuple(json.dumps(v.get(k)) for k in node.get("x-kubernetes-list-map-keys", []))
                if kind == "map" else json.dumps(v, sort_keys=True) for v in value]
        if kind in ("map", "set") and len(set(keys)) != len(keys):
            errors.append(f"{path}: duplicate entries in a list of type {kind}")
        for i, v in enumerate(value):
            _k8s_rules(v, node.get("items", {}), f"{path}[{i}]", errors)
    elif isinstance(value, dict):
        props = node.get("properties", {})
        for k, v in value.items():
            child = props.get(k) or (node["additionalProperties"]
                                     if isinstance(node.get("additionalProperties"), dict) else None)
            if child is not None:
                _k8s_rules(v, child, f"{path}.{k}", errors)


# apimachinery's label syntax: an optional DNS-subdomain prefix and a name, values up to 63 characters.
_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
LABEL_VALUE = re.compile(rf"^{_NAME}?$")


def _labels(value: Any, path: str, errors: list[str]) -> None:
    """Label syntax of every `metadata.labels` in `value` (the object's and its templates')."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "metadata" and isinstance(v, dict):
                for key, val in (v.get("labels") or {}).items():
                    if not LABEL_KEY.match(key) or not isinstance(val, str) or not LABEL_VALUE.match(val):
                        errors.append(f"{path}.metadata.labels: invalid label {key}={val!r}")
            _labels(v, f"{path}.{k}", errors)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _labels(v, f"{path}[{i}]", errors)


def validate(obj: dict, schema: dict) -> list[str]:
    """Every error the API server would report for creating `obj` under `schema`; empty when it is valid."""
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(_json_schema(schema)).iter_errors(obj)]
    _k8s_rules(obj, schema, "<root>", errors)
    _labels(obj, "<root>", errors)
    return errors
