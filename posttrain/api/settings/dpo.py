"""``spec.dpo``: Direct Preference Optimization (Rafailov et al., 2023) and its losses.

Defaults are TRL's ``DPOConfig`` (``beta`` 0.1, ``rpo_alpha`` off, ``precompute_ref_log_probs``
false) and, for ``lossType: simpo``, TRL's ``CPOConfig`` (``simpo_gamma`` 0.5; its ``beta``
default is also 0.1, the SimPO paper uses 2.0 to 2.5: set ``beta`` for SimPO).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.api.base import FieldValueError, Spec


class DpoSpec(Spec):
    beta: float = Field(
        0.1,
        gt=0,
        description="Inverse temperature of the implicit reward (TRL's default 0.1; SimPO's paper "
        "uses 2.0 to 2.5).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid",
        description="DPO loss variant; simpo: SimPO (Meng et al. 2024, TRL's CPOTrainer), "
        "reference-free on mean per-token log-probs (no reference model is kept).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Conservative DPO label smoothing: the share of pairs taken to be mislabelled "
        "(lossType sigmoid or simpo).",
    )
    simpo_gamma: float = Field(
        0.5,
        ge=0,
        description="SimPO's target reward margin gamma (lossType simpo; TRL's simpo_gamma 0.5).",
    )
    rpo_alpha: float | None = Field(
        None,
        ge=0,
        description="Weight of the chosen answer's NLL added to the loss (RPO, Pang et al. 2024; "
        "TRL's rpo_alpha, off by default; the paper uses 1.0).",
    )
    precompute_reference_log_probs: bool = Field(
        False,
        description="Score every pair under the initial model once before training and keep "
        "the log-probs, so no reference model is held while training (TRL's "
        "precompute_ref_log_probs).",
    )

    @model_validator(mode="after")
    def _check(self) -> DpoSpec:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise FieldValueError(
                "labelSmoothing",
                f"labelSmoothing applies to lossType sigmoid (conservative DPO) or simpo, not "
                f"{self.loss_type}; remove it or use lossType sigmoid",
            )
        if self.precompute_reference_log_probs and self.loss_type == "simpo":
            raise FieldValueError(
                "precomputeReferenceLogProbs",
                "lossType simpo uses no reference model; remove precomputeReferenceLogProbs",
            )
        return self

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"
