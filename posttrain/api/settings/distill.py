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

    beta: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Generalised JSD's beta (GKD, Agarwal et al. 2024) for strategy logit: 0 the "
        "forward KL(teacher || student), 1 the reverse KL(student || teacher). Unset: off-policy "
        "the logit strategy's T^2 x forward KL (Hinton), on-policy 1.0 (reverse KL, TRL's "
        "DistillationTrainer default).",
    )
    on_policy: bool = Field(
        False,
        description="GKD's on-policy distillation: on a share lmbda of the steps the student "
        "samples the completions of the batch's prompts and the teacher scores its tokens "
        "(strategy logit).",
    )
    lmbda: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With onPolicy: the share of steps trained on the student's own samples "
        "(GKD's lambda, TRL's GKDConfig default 0.5), drawn per step from (seed, step).",
    )

    @property
    def jsd_beta(self) -> float | None:
        """The generalised JSD's beta in use, or None for Hinton's T^2 forward KL."""
        if self.beta is not None:
            return self.beta
        return 1.0 if self.on_policy else None

    @model_validator(mode="after")
    def _layers_need_a_layer_strategy(self) -> DistillSpec:
        if self.layers is not None and self.strategy == "logit":
            raise FieldValueError(
                "layers",
                "layers pairs are read by strategy attention or feature only; strategy logit "
                "matches the output distributions (remove layers or change strategy)",
            )
        for name, used in (("onPolicy", self.on_policy), ("beta", self.beta is not None)):
            if used and self.strategy != "logit":
                raise FieldValueError(
                    name,
                    f"{name} is read by strategy logit only (the generalised JSD over the "
                    f"vocabulary), not {self.strategy}",
                )
        return self
