"""GSPO-token (Zheng et al., 2025) on the GRPO family: its policy objective applies the sequence-level
ratio per token (``grpo_loss.gspo_token_loss``); its clip ranges are its settings' defaults."""

from __future__ import annotations

from posttrain.trainer.algorithms import grpo_loss, parts
from posttrain.trainer.algorithms.grpo import family

parts.register_objective("gspo-token")(grpo_loss.gspo_token_loss)
declare, build = family("gspo-token")
