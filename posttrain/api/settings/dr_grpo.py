"""``spec.drGrpo``: Dr. GRPO (Liu et al., 2025). GRPO's settings with its defaults: no std
normalisation (group-mean), the constant normaliser, beta 0 (the authors' recipe, `--beta 0` in
sail-sg/understand-r1-zero)."""

from __future__ import annotations

from pydantic import Field

from posttrain.api.settings.grpo import Advantage, GrpoSpec, LossAggregation


class DrGrpoSpec(GrpoSpec):
    beta: float = Field(0.0, ge=0, description="KL weight to the reference policy.")
    advantage: Advantage = Field("group-mean", description="r - mean within each group.")
    loss_aggregation: LossAggregation = Field(
        "constant-normalizer",
        description="Each completion's token sum / maxNewTokens, then the mean over completions.",
    )
