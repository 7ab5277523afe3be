"""DAPO (Yu et al., 2025) on the GRPO family. Its differences from GRPO are all defaults of its
settings (``posttrain/api/settings/dapo.py``): clip-higher, token-mean loss, dynamic sampling, the
soft overlong penalty, no KL. The parts are GRPO's."""

from __future__ import annotations

from posttrain.trainer.algorithms.grpo import family

declare, build = family("grpo")
