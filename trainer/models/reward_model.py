"""Reward models: Hugging Face `*ForSequenceClassification` checkpoints with one label.

Llama, Qwen2, Qwen3 and Gemma 2 reward models are the policy's decoder (`CausalLM`, loaded by
the same code) plus `score`, a linear layer hidden -> 1 without bias, on the final-norm hidden
states; the checkpoint has no `lm_head`, whatever `tie_word_embeddings` says.

Pooling follows transformers (`GenericForSequenceClassification`) exactly, quirks included:
the score is read at the rightmost token whose id is not `pad_token_id`,
`(arange(T) * (ids != pad)).argmax(-1)` (0 for a row of padding only). The attention mask is
*not* used to pool, so a real token equal to `pad_token_id` at the end of a text is skipped
(hub models with pad == eos never pool at a trailing eos), and padding with another id is pooled
into. Without `pad_token_id`, a single row pools at its last position and a batch is refused.
Positions are 0..T-1 as transformers uses by default (left padding does not shift them).
No final logit soft-capping (Gemma 2 applies it only in its causal LM).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from posttrain.trainer import storage
from posttrain.trainer.models.checkpoint_io import CONFIG_FILE, load_weights
from posttrain.trainer.models.config import ModelConfig
from posttrain.trainer.models.transformer import CausalLM, _linear

# Families whose classifier transformers builds on the same decoder we load (Gemma 3's is the
# multimodal model's and is not covered).
REWARD_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2")


def pool_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """[B] position each row is scored at, as transformers chooses it (see the module docstring)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError(
                "the reward model's config has no pad_token_id, so a batch of several rows cannot "
                "be pooled (transformers refuses it too); score one text at a time"
            )
        return jnp.full((B,), T - 1, jnp.int32)
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32)[None, :] * real, axis=-1).astype(jnp.int32)


class RewardModel(CausalLM):
    """The decoder plus the `score` head. `model(ids)` gives the head at every position,
    [B, T, 1] float32 (what transformers computes before pooling); `scores(ids)` the pooled [B]."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        # Built as tied so that no lm_head parameter exists (or is expected from the checkpoint).
        super().__init__(
            dataclasses.replace(config, tie_word_embeddings=True),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        param_dtype = dtype if param_dtype is None else param_dtype
        # float32 compute: one output per sequence, and a bf16 score would round rewards.
        self.score = _linear(
            config.hidden_size,
            1,
            ("embed", "norm"),
            bias=False,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def logits(self, hidden_bte: jax.Array) -> jax.Array:
        """The score head on final-norm outputs, [..., 1] float32 (no soft-capping)."""
        return self.score(hidden_bte.astype(jnp.float32))

    def scores(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[B] float32 rewards, pooled as transformers pools (by pad_token_id, not by the mask)."""
        B, T = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        hidden, _ = self.hidden_states(input_ids, attention_mask, positions=positions)
        index = pool_index(input_ids, self.config.pad_token_id)
        pooled = hidden[jnp.arange(B), index]  # the head is linear: pool first, apply once
        return self.logits(pooled)[:, 0]


def reward_model_config(hf: dict[str, Any], source: str) -> ModelConfig:
    """The decoder config of a one-label classifier's config.json; refuses anything else."""
    archs = hf.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"{source}: config.json architectures {archs} name no *ForSequenceClassification; "
            "a reward model is a sequence classifier with one label"
        )
    # transformers writes id2label, not num_labels; without either it defaults to 2.
    labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    if labels != 1:
        raise ValueError(f"{source}: the classifier has {labels} labels; a reward model has 1")
    if hf.get("model_type") not in REWARD_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {hf.get('model_type')!r} is not supported for reward models; "
            f"supported: {', '.join(REWARD_MODEL_TYPES)}"
        )
    return ModelConfig.from_hf(hf)


def load_reward_model(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, mesh: Mesh | None = None
) -> RewardModel:
    """Load a reward model from a local folder, `gs://bucket/dir` or `hf://org/name`."""
    local = storage.local_path(str(path), allow_patterns=("*.json", "*.safetensors"))
    config_path = os.path.join(local, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}")
    with open(config_path) as f:
        config = reward_model_config(json.load(f), str(path))
    model = nnx.eval_shape(lambda: RewardModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load_weights(model, local, mesh=mesh, source=str(path))
    return model
