"""``spec.kto``: KTO (Ethayarajh et al., 2024), preference optimisation from unpaired answers each
labelled desirable or not, with TRL's ``KTOConfig`` defaults (beta 0.1, both weights 1.0)."""

from __future__ import annotations

from pydantic import Field

from posttrain.api.base import Spec


class KtoSpec(Spec):
    beta: float = Field(
        0.1, gt=0, description="Inverse temperature of the implicit reward (TRL's default 0.1)."
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="lambda_D: weight of the desirable rows' loss (TRL's 1.0)."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="lambda_U: weight of the undesirable rows' loss (TRL's 1.0)."
    )
    label_field: str = Field(
        "label",
        min_length=1,
        max_length=256,
        description="Field of a training row holding its label: true (desirable) or false.",
    )
