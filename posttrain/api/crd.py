"""The PostTrainJob CustomResourceDefinition, generated from the pydantic model.

pydantic emits JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3 schema: no
$ref, no anyOf-with-null, no `additionalProperties` beside `properties`, draft-4 style
exclusive bounds. `structural_schema` does that translation; `crd()` adds what the API server
can check itself (CEL rules), printer columns and the status subresource.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from posttrain.api import v1alpha1 as api
from posttrain.api.algorithms import REGISTRY

# Keys pydantic emits that a structural schema must not carry (or that add only noise).
_DROP = {"title", "$defs", "discriminator"}

# Phases during which the spec (except `suspend`) is frozen: the JobSet was rendered from it.
ACTIVE_PHASES = ("Pending", "Queued", "Provisioning", "Running", "Suspended")


def structural_schema(model: type[api.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return _convert(raw, defs)


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) != 1:
            raise ValueError(f"cannot express union {node} in a structural schema")
        converted = _convert({**options[0], **rest}, defs)
        if nullable:
            converted["nullable"] = True
        return converted
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties" and (value is False or "properties" in node):
            continue  # unknown fields: the API server prunes or (kubectl --validate=strict) rejects
        if key == "const":
            out["enum"] = [value]
            continue
        if key == "default" and value is None:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            # The API server checks a whole-number value against int64(bound): with a
            # fractional exclusive bound (lt=0.5) it would refuse 0 (0 < int64(0.5) = 0 fails)
            # and the CRD's own default. Such a bound is inclusive here; the model, which the
            # operator validates with, keeps it exclusive.
            if float(value).is_integer():
                out[key] = True
            continue
        if key == "maxLength" and node.get("type") == "object":
            out["maxProperties"] = value  # pydantic's dict max_length
            continue
        out[key] = _convert(value, defs)
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _has_equal(path_new: str, path_old: str, field: str) -> str:
    a, b = f"{path_new}.{field}", f"{path_old}.{field}"
    return f"(has({a}) == has({b}) && (!has({a}) || {a} == {b}))"


def _spec_rules() -> list[dict[str, str]]:
    """What the API server can check of the algorithm blocks without our code."""
    rules = []
    for e in REGISTRY.values():
        rules.append(
            {
                "rule": f"!has(self.{e.block}) || self.algorithm == '{e.name}'",
                "message": f"spec.{e.block} is read only by algorithm {e.name}",
                "fieldPath": f".{e.block}",
            }
        )
        if e.required:
            rules.append(
                {
                    "rule": f"self.algorithm != '{e.name}' || has(self.{e.block})",
                    "message": f"algorithm {e.name} needs spec.{e.block}",
                }
            )
        if "environment" in e.settings.model_fields:  # the GRPO family: rewards or an environment
            rewards = f"self.{e.block}.rewards"
            rules.append(
                {
                    "rule": f"!has(self.{e.block}) || has(self.{e.block}.environment) || "
                    f"(has({rewards}) && size({rewards}) > 0)",
                    "message": f"spec.{e.block}.rewards: give at least 1 reward, or an environment",
                    "fieldPath": f".{e.block}.rewards",
                }
            )
    # Geometry the API server can check alone (the rest needs the accelerator catalogue:
    # posttrain validate and the operator, posttrain/api/geometry.py). batchSize has a default.
    rules.append(
        {
            "rule": "!has(self.training.microBatchSize) || "
            "self.training.batchSize % self.training.microBatchSize == 0",
            "message": "spec.training.microBatchSize must divide spec.training.batchSize",
            "fieldPath": ".training.microBatchSize",
        }
    )
    rules.append(
        {
            "rule": "(has(self.output) && has(self.output.dir)) || (has(self.training.checkpoint)"
            " && has(self.training.checkpoint.dir))",
            "message": f"spec.output.dir: {api.OUTPUT_DIR_REQUIRED}",
            "fieldPath": ".output.dir",
        }
    )
    return rules


def _immutability_rule() -> dict[str, str]:
    fields = [f.alias or n for n, f in api.PostTrainJobSpec.model_fields.items() if n != "suspend"]
    same = " && ".join(_has_equal("self.spec", "oldSelf.spec", f) for f in fields)
    phases = "[" + ", ".join(f"'{p}'" for p in ACTIVE_PHASES) + "]"
    return {
        "rule": (
            "!has(oldSelf.status) || !has(oldSelf.status.phase) || "
            f"!(oldSelf.status.phase in {phases}) || ({same})"
        ),
        "message": (
            "spec is immutable while the job is active (Pending, Queued, Provisioning, Running, Suspended), "
            "except spec.suspend; delete the PostTrainJob and create it again to change it"
        ),
    }


PRINTER_COLUMNS = [
    {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm"},
    {"name": "Model", "type": "string", "jsonPath": ".status.summary.model"},
    {"name": "Accelerator", "type": "string", "jsonPath": ".status.summary.accelerator"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.summary.progress"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.summary.eta", "priority": 1},
    # Async RL (spec.rollout.mode async): empty for every other job.
    {"name": "Policy", "type": "integer", "jsonPath": ".status.rollout.policyVersion"},
    {"name": "Staleness", "type": "number", "jsonPath": ".status.rollout.stalenessMean"},
    {"name": "Sync-s", "type": "number", "jsonPath": ".status.rollout.weightSyncSeconds"},
    {"name": "Rollout-tok/s", "type": "number", "jsonPath": ".status.rollout.tokensPerSecond"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {
        "name": "Checkpoint",
        "type": "integer",
        "jsonPath": ".status.progress.lastCheckpointStep",
        "priority": 1,
    },
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {
        "name": "Readmissions",
        "type": "integer",
        "jsonPath": ".status.readmissions",
        "priority": 1,
    },
    {"name": "JobSet", "type": "string", "jsonPath": ".status.jobSetName", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    spec_schema = structural_schema(api.PostTrainJobSpec)
    spec_schema["x-kubernetes-validations"] = _spec_rules()
    status_schema = structural_schema(api.PostTrainJobStatus)
    schema = {
        "type": "object",
        "description": "A post-training job: SFT, RL, preference tuning or distillation of a language model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [_immutability_rule()],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.KIND.lower(),
                "shortNames": ["ptj"],
                "categories": ["posttrain"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `posttrain crd` from posttrain/api/v1alpha1.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
