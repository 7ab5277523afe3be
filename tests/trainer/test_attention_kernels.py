"""Kernel choice and the Pallas splash-attention path, run in interpret mode on the CPU and
compared with ``reference_attention`` on real tokens (no TPU here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain.trainer.models import attention_kernels as ak
from posttrain.trainer.models import builtin_config, create_model, set_attention
from posttrain.trainer.models.transformer import attention_masks, reference_attention

T = ak.SPLASH_BLOCK  # the smallest length the kernel takes


def _qkv(B=2, H=4, K=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    return q, k, v


def _padded_and_packed(B=2):
    mask = np.ones((B, T), np.int32)
    mask[0, :10] = 0  # left padding
    mask[1, -7:] = 0  # right padding
    segments = np.ones((B, T), np.int32)
    segments[1, 60:] = 2  # two packed examples
    segments[1, -7:] = 0
    return mask, segments


def test_kernel_segment_ids_put_padding_in_segment_zero():
    mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(ak.kernel_segment_ids(mask, None), [[0, 1, 1, 1], [1, 1, 1, 0]])
    packed = jnp.asarray([[1, 1, 2, 2], [1, 2, 3, 0]])
    np.testing.assert_array_equal(ak.kernel_segment_ids(mask, packed), [[0, 1, 2, 2], [1, 2, 3, 0]])


@pytest.mark.parametrize(
    "implementation, backend, devices, dtype, q_len, cached, cap, want",
    [
        ("auto", "tpu", 1, jnp.bfloat16, 256, False, None, "splash"),
        ("auto", "tpu", 1, jnp.bfloat16, 256, False, 50.0, "splash"),  # soft-capping in-kernel
        ("auto", "tpu", 1, jnp.bfloat16, 100, False, None, "xla"),  # not a block multiple
        ("auto", "tpu", 1, jnp.bfloat16, 100, False, 50.0, "reference"),
        ("auto", "tpu", 1, jnp.bfloat16, 256, True, None, "xla"),  # decoding with a cache
        ("auto", "tpu", 8, jnp.bfloat16, 256, False, None, "xla"),  # no mesh set for shard_map
        ("splash", "tpu", 8, jnp.bfloat16, 256, False, None, "splash"),
        ("splash", "cpu", 1, jnp.float32, 256, False, None, "splash"),
        ("splash", "cpu", 1, jnp.float32, 100, False, None, "grouped"),  # falls back as "auto"
        ("auto", "gpu", 1, jnp.bfloat16, 256, False, None, "cudnn"),
        ("auto", "gpu", 1, jnp.float32, 256, False, None, "xla"),
        ("auto", "cpu", 1, jnp.float32, 256, False, None, "grouped"),  # its backward for XLA:CPU
        ("auto", "cpu", 1, jnp.float32, 256, False, 50.0, "reference"),
        ("grouped", "tpu", 1, jnp.bfloat16, 256, False, None, "grouped"),
        ("xla", "tpu", 1, jnp.bfloat16, 256, False, None, "xla"),
        ("reference", "tpu", 1, jnp.bfloat16, 256, False, None, "reference"),
    ],
)
def test_choose_kernel(implementation, backend, devices, dtype, q_len, cached, cap, want):
    got = ak.choose_kernel(
        implementation,
        dtype=jnp.dtype(dtype),
        q_len=q_len,
        kv_len=q_len,
        cached=cached,
        logit_cap=cap,
        backend=backend,
        devices=devices,
    )
    assert got == want


def test_auto_picks_splash_on_several_tpus_only_with_a_mesh_set():
    """With ``jax.set_mesh`` (``mesh_in_scope``) splash runs per shard under ``shard_map``
    (tests/trainer/test_attention_kernels_sharded.py); without it XLA would gather q, k, v."""
    args = dict(dtype=jnp.bfloat16, q_len=256, kv_len=256, cached=False, backend="tpu", devices=8)
    assert ak.choose_kernel("auto", logit_cap=None, mesh_in_scope=True, **args) == "splash"
    assert ak.choose_kernel("auto", logit_cap=50.0, mesh_in_scope=True, **args) == "splash"
    assert ak.choose_kernel("auto", logit_cap=None, mesh_in_scope=False, **args) == "xla"
    assert ak.choose_kernel("auto", logit_cap=50.0, mesh_in_scope=False, **args) == "reference"
    assert ak.current_mesh() is None  # none set here (and one device)


def test_target_backend_chooses_for_another_backend_while_in_scope():
    """``posttrain plan`` traces a TPU's step on a CPU host: the TPU's kernel, not the CPU's."""
    args = dict(dtype=jnp.bfloat16, q_len=256, kv_len=256, cached=False, logit_cap=None, devices=1)
    assert ak.current_backend() == jax.default_backend() == "cpu"
    assert ak.choose_kernel("auto", **args) == "grouped"
    with ak.target_backend("tpu"):
        assert ak.current_backend() == "tpu"
        assert ak.choose_kernel("auto", **args) == "splash"
        with ak.target_backend(None):  # None: JAX's default again
            assert ak.choose_kernel("auto", **args) == "grouped"
    assert ak.choose_kernel("auto", **args) == "grouped"
    with ak.target_backend("gpu"):
        assert ak.choose_kernel("auto", **args) == "cudnn"
        assert ak.choose_kernel("splash", **args) == "cudnn"  # no splash kernel on a GPU


def test_choose_kernel_refuses_unknown_names():
    with pytest.raises(ValueError, match="splash"):
        ak.choose_kernel(
            "flash", dtype=jnp.float32, q_len=T, kv_len=T, cached=False, logit_cap=None
        )


@pytest.mark.parametrize(
    "window, cap, packed, heads",
    [
        (None, None, False, (4, 2)),  # causal + padding, grouped-query
        (None, None, True, (4, 2)),  # packed segments
        (32, None, False, (4, 4)),  # sliding window, multi-head
        (None, 30.0, True, (4, 1)),  # soft-capping, multi-query
    ],
)
def test_splash_equals_the_reference_on_real_tokens(window, cap, packed, heads):
    H, K = heads
    q, k, v = _qkv(H=H, K=K)
    mask, segments = _padded_and_packed()
    seg = jnp.asarray(segments) if packed else None
    ids = ak.kernel_segment_ids(jnp.asarray(mask), seg)
    got = ak.splash_attention(q, k, v, ids, 0.25, sliding_window=window, logit_cap=cap)
    full, sliding = attention_masks(jnp.arange(T), jnp.asarray(mask), window, seg)
    want = reference_attention(q, k, v, full if window is None else sliding, 0.25, cap)
    real = ak.kernel_segment_ids(jnp.asarray(mask), seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


def test_splash_gradients_equal_the_reference():
    q, k, v = _qkv(B=1)
    mask = np.ones((1, T), np.int32)
    mask[0, :5] = 0
    ids = ak.kernel_segment_ids(jnp.asarray(mask), None)
    full, _ = attention_masks(jnp.arange(T), jnp.asarray(mask), None)
    weights = jnp.asarray(mask, jnp.float32)[:, :, None, None] * jnp.linspace(0.5, 1.5, 16)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    splash = loss(lambda q, k, v: ak.splash_attention(q, k, v, ids, 0.25))
    ref = loss(lambda q, k, v: reference_attention(q, k, v, full, 0.25, None))
    got = jax.grad(splash, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def _splash_mask(segment_ids_bt: np.ndarray, sliding_window: int | None) -> np.ndarray:
    """The boolean [B, T, T] mask splash applies: causal (within the window), same segment."""
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= q - k < sliding_window
    return allowed[None] & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])


def test_splash_masks_are_the_models_masks_on_real_tokens():
    mask, segments = _padded_and_packed()
    ids = np.asarray(ak.kernel_segment_ids(jnp.asarray(mask), jnp.asarray(segments)))
    for window in (None, 9):
        full, sliding = attention_masks(jnp.arange(T), jnp.asarray(mask), window, segments)
        model_mask = np.asarray(full if window is None else sliding)
        real = ids > 0
        np.testing.assert_array_equal(_splash_mask(ids, window)[real], model_mask[real])


def test_a_model_forced_to_splash_equals_the_reference():
    model = create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 64, size=(2, T)), jnp.int32)
    mask, segments = _padded_and_packed()
    set_attention(model, "reference")
    want = model(ids, segment_ids=jnp.asarray(segments))
    set_attention(model, "splash")
    got = model(ids, segment_ids=jnp.asarray(segments))
    real = segments > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4)
