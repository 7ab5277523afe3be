"""A reward model as a reward function (`rewardModel` items of `spec.<grpo family>.rewards`).

The model (`models/reward_model.py`: a Hugging Face *ForSequenceClassification with one label) is
loaded once, frozen, on the trainer's mesh (replicated rows, weights sharded like the policy's) in
the job's compute dtype, with the tokenizer beside its weights. Each completion is scored as the
text `prompt + completion` (the prompt as the policy saw it, chat template included), tokenised
with the reward model's tokenizer, no special tokens added, the last `maxLength` tokens kept.
Texts go through in batches of `batchSize` rows padded with the model's pad id to power-of-two
widths (at least 16), so the forward compiles once per width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from posttrain.api.settings.environment import RewardModelSpec


def _bucket(n: int) -> int:
    size = 16
    while size < n:
        size *= 2
    return size


class RewardModelReward:
    """`fn(prompts, completions, **columns) -> list[float]` backed by a reward model."""

    def __init__(self, spec: RewardModelSpec, where: str, *, mesh: Any = None, dtype: Any = None):
        import jax.numpy as jnp
        from flax import nnx

        from posttrain.trainer.data.text import HfTokenizer
        from posttrain.trainer.models.reward_model import load_reward_model

        self.spec, self.where, self.mesh = spec, where, mesh
        self.model = load_reward_model(
            spec.path, dtype=jnp.float32 if dtype is None else dtype, mesh=mesh
        )
        self.tokenizer = HfTokenizer(spec.path)
        self.pad = self.model.config.pad_token_id
        # The model as an argument, not a closure: its weights must not become compiled constants.
        self._scores = nnx.jit(lambda m, ids, mask: m.scores(ids, mask))

    def _put(self, x: np.ndarray) -> Any:
        if self.mesh is None:
            return x
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **columns: Any
    ) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        encoded = [self.tokenizer.encode(t)[-self.spec.max_length :] for t in texts]
        rows = self.spec.batch_size if self.pad is not None else 1
        out: list[float] = []
        for start in range(0, len(encoded), rows):
            chunk = encoded[start : start + rows]
            width = _bucket(max(1, *(len(r) for r in chunk)))
            if self.pad is None:  # one row, pooled at its last position: no padding at all
                width = max(1, len(chunk[0]))
            ids = np.full((rows, width), self.pad if self.pad is not None else 0, np.int32)
            mask = np.zeros((rows, width), np.int32)
            for i, row in enumerate(chunk):
                ids[i, : len(row)], mask[i, : len(row)] = row, 1
            scores = np.asarray(self._scores(self.model, self._put(ids), self._put(mask)))
            out.extend(float(v) for v in scores[: len(chunk)])
        return out
