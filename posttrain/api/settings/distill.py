"""``spec.distill``: knowledge distillation from a frozen teacher."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from posttrain.api.base import MAX_LIST, FieldValueError, ModelRef, Spec


class DistillSpec(Spec):
    teacher: ModelRef = Field(description="The teacher model, same sources as spec.model.base.")
    strategy: Literal["logit", "attention", "feature"] = Field(
        "logit",
        description="logit: KL to the teacher's token distribution; attention: match attention maps; "
        "feature: match projected hidden states.",
    )
    temperature: float = Field(
        2.0, gt=0, le=100, description="Softmax temperature for logit distillation."
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation loss; 1 - alpha weights the task (SFT) loss.",
    )
    layers: (
        list[
            Annotated[list[Annotated[int, Field(ge=0, le=4096)]], Field(min_length=2, max_length=2)]
        ]
        | None
    ) = Field(
        None,
        min_length=1,
        max_length=MAX_LIST,
        description="[student, teacher] layer pairs the attention and feature strategies match "
        "(0-based); default: student layer i to teacher layer round((i + 1) * Lt / Ls) - 1.",
    )

    @model_validator(mode="after")
    def _layers_need_a_layer_strategy(self) -> DistillSpec:
        if self.layers is not None and self.strategy == "logit":
            raise FieldValueError(
                "layers",
                "layers pairs are read by strategy attention or feature only; strategy logit "
                "matches the output distributions (remove layers or change strategy)",
            )
        return self
