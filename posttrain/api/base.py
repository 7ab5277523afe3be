"""What every API type shares: the pydantic base, the field-pinned error and bounded strings.

Its own module so the per-algorithm settings (``posttrain/api/settings/``) and the job spec
(``v1alpha1.py``) can both import it without importing each other.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class FieldValueError(ValueError):
    """A cross-field check's failure, pinned to the field (YAML name) the user should change."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


# Bounds keep CEL cost estimates finite and stop absurd inputs early.
MAX_STR = 4096
MAX_LIST = 64

Str = Annotated[str, Field(min_length=1, max_length=MAX_STR)]
ModelRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_STR,
        pattern=r"^(gs://[^/]+(/.*)?|hf://[^/]+/[^/]+.*|builtin:[a-z0-9-]+|/.*|\./.*|[^:]+)$",
        description=(
            "Where the weights are: a local or mounted path, gs://bucket/dir, hf://org/name, "
            "or builtin:NAME for the small built-in model (local runs and tests)."
        ),
    ),
]


class Spec(BaseModel):
    """Base for every API object: camelCase in YAML, unknown fields forbidden, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )


__all__ = ["MAX_LIST", "MAX_STR", "BaseModel", "FieldValueError", "ModelRef", "Spec", "Str"]
