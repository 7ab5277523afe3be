"""Dr. GRPO (Liu et al., 2025) on the GRPO family. Its differences are defaults of its settings
(``posttrain/api/settings/dr_grpo.py``): the group-mean advantage (no std) and the constant
normaliser (token sums / maxNewTokens), no KL. The parts are GRPO's."""

from __future__ import annotations

from posttrain.trainer.algorithms.grpo import family

declare, build = family("grpo")
