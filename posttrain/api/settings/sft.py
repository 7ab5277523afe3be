"""``spec.sft``: supervised fine-tuning."""

from __future__ import annotations

from pydantic import Field

from posttrain.api.base import Spec


class SftSpec(Spec):
    completion_only_loss: bool = Field(
        True,
        description="Loss on completion (assistant) tokens only; false trains on prompt tokens too.",
    )
