"""``spec.orpo``: ORPO (Hong et al., 2024), preference optimisation without a reference."""

from __future__ import annotations

from pydantic import Field

from posttrain.api.base import Spec


class OrpoSpec(Spec):
    lambda_: float = Field(
        0.1, alias="lambda", ge=0, description="Weight of the odds-ratio term (lambda)."
    )
