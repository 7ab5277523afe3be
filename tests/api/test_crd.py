"""The CRD: in sync with the model, structural, and agreeing with pydantic on what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from posttrain.api import JobInvalid, load_documents, parse_job
from posttrain.api.crd import crd, crd_yaml

from .test_spec import EXAMPLES, INVALID, MINIMAL, job

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "crds" / "posttrain.dev_posttrainjobs.yaml"


def test_checked_in_crd_matches_the_model() -> None:
    assert CHECKED_IN.read_text() == crd_yaml(), (
        "crds/ is stale: run `posttrain crd > crds/posttrain.dev_posttrainjobs.yaml`"
    )


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if (
            path.endswith("/x-kubernetes-validations")
            or "/properties/" in path
            and path.rsplit("/", 1)[-1] == "enum"
        ):
            continue
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
            assert banned not in node, f"{banned} at {path}"
        if "properties" in node:
            assert node.get("type") == "object", f"untyped object at {path}"
            assert "additionalProperties" not in node, (
                f"properties + additionalProperties at {path}"
            )


def test_crd_names_and_columns() -> None:
    doc = yaml.safe_load(CHECKED_IN.read_text())
    assert doc["spec"]["names"]["shortNames"] == ["ptj"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [
        c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert columns == [
        "ALGORITHM",
        "MODEL",
        "ACCELERATOR",
        "PHASE",
        "PROGRESS",
        *("POLICY", "STALENESS", "SYNC-S", "ROLLOUT-TOK/S"),  # async RL (spec.rollout)
        "AGE",
    ]


def _validator() -> jsonschema.Draft4Validator:
    # Kubernetes structural schemas are OpenAPI v3 = JSON Schema draft 4 (+ nullable, x-kubernetes-*).
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_accepted_by_both(path: Path) -> None:
    for doc in load_documents(path):
        parse_job(doc)
        _validator().validate(doc)


# Invalid jobs the OpenAPI schema alone can tell (types, enums, bounds, patterns, required). The
# rest (cross-field rules) are the CEL rules' and the operator's: see test_cel_rules_in_crd.
SCHEMA_DETECTABLE = [
    (p, path)
    for p, path, _ in INVALID
    if path
    in {
        "spec.training.steps",
        "spec.training.batchSize",
        "spec.algorithm",
        "spec.grpo.rewards[0].builtin",
        "spec.grpo.rewards[0].function",
        "spec.grpo.numGenerations",
        "spec.resources.accelerator",
        "spec.model.lora.rank",
        "spec.data.train",
    }
]


@pytest.mark.parametrize(
    ("patches", "path"), SCHEMA_DETECTABLE, ids=[p for _, p in SCHEMA_DETECTABLE]
)
def test_invalid_rejected_by_both(patches: dict[str, Any], path: str) -> None:
    doc = job(**patches)
    with pytest.raises(JobInvalid):
        parse_job(doc)
    assert list(_validator().iter_errors(doc)), f"schema accepted a job invalid at {path}"


def test_minimal_accepted_by_both() -> None:
    parse_job(MINIMAL)
    _validator().validate(MINIMAL)


def test_cel_rules_in_crd() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec_rules = [r["rule"] for r in schema["properties"]["spec"]["x-kubernetes-validations"]]
    # Every algorithm reads its own block: required ones must be present, others refused.
    assert "self.algorithm != 'grpo' || has(self.grpo)" in spec_rules
    assert "self.algorithm != 'dapo' || has(self.dapo)" in spec_rules
    assert "!has(self.grpo) || self.algorithm == 'grpo'" in spec_rules
    assert "!has(self.drGrpo) || self.algorithm == 'dr-grpo'" in spec_rules
    assert "!has(self.dpo) || self.algorithm == 'dpo'" in spec_rules
    assert not any("has(self.dpo)" in r and "||" in r and r.startswith("self.") for r in spec_rules)
    micro = "self.training.batchSize % self.training.microBatchSize == 0"
    assert any(micro in rule for rule in spec_rules)
    (immutable,) = schema["x-kubernetes-validations"]
    assert "oldSelf.status.phase" in immutable["rule"] and "suspend" not in immutable["rule"]


def test_field_reference_doc_matches_the_model() -> None:
    from posttrain.api.reference import reference

    assert (ROOT / "docs" / "api-reference.md").read_text() == reference(), (
        "docs/api-reference.md is stale: run `python -m posttrain.api.reference > docs/api-reference.md`"
    )
