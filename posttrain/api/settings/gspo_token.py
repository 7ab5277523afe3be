"""``spec.gspoToken``: GSPO-token (Zheng et al., 2025). GRPO's settings with the paper's clip
ranges (3e-4 / 4e-4): its ratio is a per-token geometric mean, so it stays near 1."""

from __future__ import annotations

from pydantic import Field

from posttrain.api.settings.grpo import GrpoSpec


class GspoTokenSpec(GrpoSpec):
    epsilon: float = Field(3e-4, gt=0, lt=1, description="Clip range (lower side), the paper's.")
    epsilon_high: float | None = Field(
        4e-4, gt=0, lt=10, description="Upper clip range, the paper's; at least epsilon."
    )
    num_mini_batches: int = Field(
        4,
        ge=1,
        le=1024,
        description=(
            "Optimizer steps per pass over a rollout batch of batchSize x numMiniBatches prompts "
            "(the GSPO paper splits each rollout batch into 4 mini-batches), so its clipping acts."
        ),
    )
