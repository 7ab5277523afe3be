"""``spec.dapo``: DAPO (Yu et al., 2025). GRPO's settings with DAPO's defaults: clip-higher
(0.2 / 0.28), token-mean loss, dynamic sampling, the soft overlong penalty, no KL term, and 16
optimizer steps per rollout batch (the recipe's 512 prompts in mini-batches of 32)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.api.settings.grpo import GrpoSpec, LossAggregation, OverlongSpec


class DapoOverlongSpec(OverlongSpec):
    """DAPO's overlong handling: the soft penalty unless the job says otherwise."""

    mode: Literal["none", "filter", "penalty"] = Field(
        "penalty", description="none, filter, or penalty (DAPO's soft overlong punishment)."
    )


class DapoSpec(GrpoSpec):
    beta: float = Field(0.0, ge=0, description="KL weight to the reference policy; DAPO drops it.")
    epsilon_high: float | None = Field(
        0.28, gt=0, lt=10, description="Upper clip range (clip-higher, the paper's 0.28)."
    )
    loss_aggregation: LossAggregation = Field(
        "token-mean", description="Mean over all completion tokens of the batch (DAPO)."
    )
    num_mini_batches: int = Field(
        16,
        ge=1,
        le=1024,
        description=(
            "Optimizer steps per pass over a rollout batch of batchSize x numMiniBatches prompts "
            "(DAPO's recipe: 512 prompts per rollout, mini-batches of 32), so clip-higher acts."
        ),
    )
    dynamic_sampling: bool = Field(
        True,
        description="Drop prompts whose G rewards are all equal and sample more (DAPO).",
    )
    overlong: DapoOverlongSpec = Field(  # type: ignore[assignment]
        default_factory=DapoOverlongSpec,
        description="DAPO's soft overlong penalty (or filter, or none).",
    )
