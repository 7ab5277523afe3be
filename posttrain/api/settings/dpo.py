"""``spec.dpo``: Direct Preference Optimization (Rafailov et al., 2023) and its losses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.api.base import FieldValueError, Spec


class DpoSpec(Spec):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO loss variant."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Conservative DPO label smoothing: the share of pairs taken to be mislabelled "
        "(lossType sigmoid only).",
    )

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DpoSpec:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise FieldValueError(
                "labelSmoothing",
                f"labelSmoothing applies to lossType sigmoid (conservative DPO), not "
                f"{self.loss_type}; remove it or use lossType sigmoid",
            )
        return self
