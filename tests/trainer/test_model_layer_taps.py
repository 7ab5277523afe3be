"""The model's per-layer outputs for distillation (``attention_probs_layers`` / ``layer_hidden``):
asking for them leaves the logits unchanged, and what comes back is what the layers computed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.models import builtin_config, create_model


@pytest.fixture(scope="module")
def model():
    return create_model(builtin_config("tiny", vocab_size=40), rngs=nnx.Rngs(1))


def inputs():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, size=(2, 7)))
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2])  # the second row is right-padded
    return ids, mask


def test_taps_leave_the_logits_and_hidden_unchanged(model):
    ids, mask = inputs()
    logits, hidden = model(ids, mask, return_hidden=True)
    logits2, hidden2, taps = model(
        ids, mask, return_hidden=True, attention_probs_layers=(1,), layer_hidden=(0, 1)
    )
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(hidden, hidden2)
    assert set(taps["attention_probs"]) == {1} and set(taps["layer_hidden"]) == {0, 1}
    # The last layer's output is what the final norm normalises.
    np.testing.assert_allclose(model.model.norm(taps["layer_hidden"][1]), hidden, rtol=1e-6)


def test_attention_probs_are_causal_masked_distributions(model):
    ids, mask = inputs()
    _, taps = model(ids, mask, attention_probs_layers=(0,))
    probs = np.asarray(taps["attention_probs"][0])
    assert probs.shape == (2, 4, 7, 7) and probs.dtype == np.float32  # [B, H, T, S]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    future = np.triu(np.ones((7, 7), bool), k=1)
    assert np.all(probs[:, :, future] == 0)
    assert np.all(probs[1, :, :5, 5:] == 0)  # real queries never attend to padding
    np.testing.assert_allclose(probs[:, :, 0, 0], 1.0)  # the first token sees only itself
    # Heads differ (a map per query head, not one shared per kv head).
    assert not np.allclose(probs[:, 0], probs[:, 1])


def test_layers_out_of_range_are_refused(model):
    ids, mask = inputs()
    with pytest.raises(ValueError, match=r"layers \[2\] out of range for a model with 2 layers"):
        model(ids, mask, layer_hidden=(2,))
