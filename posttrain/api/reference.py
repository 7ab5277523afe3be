"""Field reference for docs/api-reference.md, generated from the model so it cannot drift.

python -m posttrain.api.reference > docs/api-reference.md
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from posttrain.api import v1alpha1 as api


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) or value in ([], {}) else f"`{value}`"
    if field.default is None or field.default is PydanticUndefined:
        return ""
    value = field.default
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def rows(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{field.alias or name}"
        doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
        sub = _nested(field.annotation)
        if sub is not None and sub is not model:
            out += rows(sub, f"{key}[]" if typing.get_origin(field.annotation) is list else key)
    return out


def reference() -> str:
    head = [
        "# PostTrainJob field reference",
        "",
        f"`apiVersion: {api.API_VERSION}`, `kind: {api.KIND}`. Generated from "
        "`posttrain/api/v1alpha1.py` and the settings in `posttrain/api/settings/` by "
        "`python -m posttrain.api.reference`; do not edit by hand.",
        "Unknown fields are errors. Each algorithm reads its own block, named after it in "
        "camelCase (`dr-grpo` reads `spec.drGrpo`), whose defaults are that algorithm's; "
        "blocks of other algorithms are refused.",
        "",
        "| field | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    status = [
        "",
        "## Status (written by the operator and the trainer)",
        "",
        "| field | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    return (
        "\n".join(
            head
            + rows(api.PostTrainJobSpec, "spec")
            + status
            + rows(api.PostTrainJobStatus, "status")
        )
        + "\n"
    )


if __name__ == "__main__":
    print(reference(), end="")
