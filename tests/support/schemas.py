"""Validators for what `kiban compose` and `kiban render k8s` write, from the specs' own schemas.

- Compose: the Compose Specification's JSON schema (tests/data/compose-spec/);
- Kubernetes built-in kinds: Kubernetes' JSON schemas for one pinned version, strict
  (unknown fields are errors), as the PyPI package kubernetes-validate ships them;
- prometheus-operator's kinds: the openAPIV3Schema of its CRDs (tests/data/prometheus-operator/),
  made strict the way the API server's field validation is (an object with declared
  properties accepts no others unless it says x-kubernetes-preserve-unknown-fields).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

DATA = Path(__file__).resolve().parents[1] / "data"
KUBERNETES_VERSION = "1.34.0"
_CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules-v1.json",
}


@functools.cache
def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DATA / "compose-spec" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def compose_errors(document: dict[str, Any]) -> list[str]:
    """Every way *document* breaks the Compose Specification (empty: valid)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in compose_validator().iter_errors(document)
    ]


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(filename: str) -> jsonschema.Draft7Validator:
    schema = json.loads((DATA / "prometheus-operator" / filename).read_text())
    return jsonschema.Draft7Validator(_strict(copy.deepcopy(schema)))


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    """Every way *obj* breaks its kind's schema (empty: valid); unknown kinds are errors."""
    crd = _CRDS.get((obj.get("apiVersion"), obj.get("kind")))
    if crd is not None:
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _crd_validator(crd).iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(map(str, err.path)) or '<root>'}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [err.message]
    return []
