"""SFT's loss against a numpy reference: the mean next-token NLL over the batch's trained tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.algorithms import sft
from posttrain.trainer.algorithms.base import Models
from posttrain.trainer.data import sft as data
from posttrain.trainer.models import builtin_config, create_model

VOCAB = 40


def np_sft_loss(
    logits_btv: np.ndarray, tokens: list[tuple[int, ...]], trained: list[tuple[bool, ...]]
):
    """Cross-entropy of token t+1 given tokens <= t, averaged over every trained target token."""
    nll = []
    for b, (toks, loss) in enumerate(zip(tokens, trained, strict=True)):
        for t in range(len(toks) - 1):
            if loss[t + 1]:
                z = logits_btv[b, t].astype(np.float64)
                log_z = z.max() + np.log(np.exp(z - z.max()).sum())
                nll.append(log_z - z[toks[t + 1]])
    return float(np.mean(nll))


def test_sft_loss_is_the_mean_nll_over_trained_tokens():
    model = create_model(builtin_config("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # rows of different lengths and trained spans: a mean per row would differ from this
    examples = [
        data.Example(tuple(rng.integers(3, VOCAB, n)), (False,) * (n - k) + (True,) * k)
        for n, k in ((10, 2), (6, 5), (12, 9), (4, 1))
    ]
    batch = data.collate(examples, 12, 0)
    value, metrics = sft.loss(Models(policy=model), {k: jnp.asarray(v) for k, v in batch.items()})
    logits = np.asarray(
        model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    )
    expected = np_sft_loss(logits, [e.tokens for e in examples], [e.loss for e in examples])
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["trained_tokens_per_row"]) == pytest.approx((2 + 5 + 9 + 1) / 4)
