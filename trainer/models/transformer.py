"""Decoder-only transformer in Flax NNX covering Llama 3, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text).

Module and attribute names mirror Hugging Face's (``model.layers.0.self_attn.q_proj``), so a
parameter's path is its HF tensor name with ``kernel``/``embedding`` for ``weight``. Projections are
plain ``nnx.Linear`` (kernel ``[in, out]``, HF's weight transposed), so LoRA wrappers attach to them.

Shapes: B batch, T query tokens, S key slots, H query heads, K kv heads, G = H // K, D head_dim,
E hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain.trainer.models.attention_kernels import (
    IMPLEMENTATIONS,
    choose_kernel,
    current_backend,
    kernel_segment_ids,
    splash_attention,
)
from posttrain.trainer.models.config import ModelConfig
from posttrain.trainer.models.grouped_attention import (
    MASKED,
    from_rows,
    grouped_attention,
    to_rows,
)

# --------------------------------------------------------------------------- pure functions


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: bool) -> jax.Array:
    """RMSNorm as transformers computes it: statistics in float32; Gemma applies (1 + w) in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)  # float32 master weights, compute dtype out


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: Any) -> jax.Array:
    """Rotary embedding, rotate-half layout (HF's, not interleaved pairs); ``inv_freq`` [D/2]."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(emb).astype(x_bthd.dtype), jnp.sin(emb).astype(x_bthd.dtype)
    x1, x2 = jnp.split(x_bthd, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_bthd * cos + rotated * sin


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"activation {name!r} not supported")


def attention_masks(
    q_slots_t: jax.Array,
    key_mask_bs: jax.Array,
    sliding_window: int | None,
    segment_ids_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Boolean [B, T, S] masks (True = may attend) for full and sliding-window layers.

    Slots are cache indices (or sequence indices without a cache). With left padding, slot
    distance equals token distance among real tokens, so the window is measured in slots.
    ``segment_ids_bt`` (no cache, so T == S and query t is key slot t): a query sees only keys of
    its own segment, so packed examples stay independent.
    """
    k_slots_s = jnp.arange(key_mask_bs.shape[1])
    causal_ts = k_slots_s[None, :] <= q_slots_t[:, None]
    full = causal_ts[None] & key_mask_bs[:, None, :].astype(bool)
    if segment_ids_bt is not None:
        full = full & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    if sliding_window is None:
        return full, None
    # transformers keeps key k for query q when q - k < window (the window counts the query itself).
    in_window_ts = (q_slots_t[:, None] - k_slots_s[None, :]) < sliding_window
    return full, full & in_window_ts[None]


def reference_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    mask_bts: jax.Array,
    scale: float,
    logit_cap: float | None,
    *,
    return_probs: bool = False,
) -> Any:
    """Grouped-query attention in plain XLA ops, [B, T, H, D]: the reference every kernel must match.

    The only path with attention-logit soft-capping (Gemma 2), and the only one that can return
    the probabilities ([B, H, T, S] float32, query head h = kv head h // G; distillation).
    """
    B, T, H, D = q_bthd.shape
    K = k_bskd.shape[2]
    q = q_bthd.reshape(B, T, K, H // K, D)  # query head h uses kv head h // G (grouped, not tiled)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, logit_cap)
    # Most negative finite float, not -inf: a query whose window holds only padding then gets
    # uniform (ignored) weights instead of NaN, which would leak into valid positions via 0 * NaN.
    scores = jnp.where(mask_bts[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_bskd.dtype), v_bskd).reshape(B, T, H, D)
    if return_probs:  # float32, not the compute dtype: bf16 maps are too coarse to match
        return out, probs.reshape(B, H, T, -1)
    return out


def fused_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    mask_bts: jax.Array,
    scale: float,
    implementation: str,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with our boolean mask (causal, padding, segments, window).

    ``implementation``: "auto" picks cuDNN's fused kernel on a GPU for 16-bit activations and XLA
    otherwise (cuDNN has no float32 kernel); "xla" or "cudnn" force one.
    """
    kernel: Literal["xla", "cudnn"] = "cudnn" if implementation == "cudnn" else "xla"
    if implementation == "auto":
        cudnn = current_backend() == "gpu" and q_bthd.dtype in (jnp.bfloat16, jnp.float16)
        kernel = "cudnn" if cudnn else "xla"
    dtype = q_bthd.dtype  # the cache may hold another dtype; the kernel wants one
    return jax.nn.dot_product_attention(
        q_bthd,
        k_bskd.astype(dtype),
        v_bskd.astype(dtype),
        mask=mask_bts[:, None],  # [B, 1, T, S], broadcast over heads
        scale=scale,
        implementation=kernel,
    )


def cached_attention(
    q_bthd: jax.Array,
    k_bkds: jax.Array,
    v_bksd: jax.Array,
    mask_bts: jax.Array,
    scale: float,
    logit_cap: float | None,
    *,
    return_probs: bool = False,
) -> Any:
    """Grouped-query attention of T new queries over a KV cache (keys [B, K, D, S], values
    [B, K, S, D]): the maths of ``reference_attention``, for generation (prefill and decode steps).

    Both einsums are plain [X, D] @ [D, S] and [X, S] @ [S, D] matmuls batched over (B, K), with
    X = T * G query rows per kv head, on the cache as it is stored. Measured on the CPU decode
    benchmark: a [B, S, K, D] cache made XLA transpose every layer's whole cache on every step,
    einsums with T between B and K got slow dot layouts, and keys stored [B, K, S, D] (a
    transposed operand) made the score matmuls slower than with [B, K, D, S]. For a decode step
    (T = 1) the reshapes of q and the output are free. Returns [B, T, H, D], plus with
    ``return_probs`` the probabilities [B, H, T, S] float32 (query head h = kv head h // G).
    """
    B, T, H, _ = q_bthd.shape
    K = k_bkds.shape[1]
    G = H // K
    q_bkxd = to_rows(q_bthd, K)
    k, v = k_bkds.astype(q_bkxd.dtype), v_bksd.astype(q_bkxd.dtype)  # no-ops unless they differ
    scores = jnp.einsum("bkxd,bkds->bkxs", q_bkxd, k, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, logit_cap).reshape(B, K, T, G, -1)
    # Most negative finite float, not -inf, as in reference_attention.
    scores = jnp.where(mask_bts[:, None, :, None], scores, MASKED)
    probs_bktgs = jax.nn.softmax(scores, axis=-1)
    probs_bkxs = probs_bktgs.reshape(B, K, T * G, -1).astype(v.dtype)
    out = from_rows(jnp.einsum("bkxs,bksd->bkxd", probs_bkxs, v), T)
    if return_probs:
        return out, probs_bktgs.transpose(0, 1, 3, 2, 4).reshape(B, H, T, -1)
    return out


def write_kv(
    kv: tuple[jax.Array, jax.Array], k_btkd: jax.Array, v_btkd: jax.Array, slot: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The cache (keys [B, K, D, S], values [B, K, S, D]) with the T new keys/values written at
    slots [slot, slot + T)."""
    k_bkdt = k_btkd.transpose(0, 2, 3, 1).astype(kv[0].dtype)
    v_bktd = v_btkd.transpose(0, 2, 1, 3).astype(kv[1].dtype)
    keys = jax.lax.dynamic_update_slice(kv[0], k_bkdt, (0, 0, 0, slot))
    values = jax.lax.dynamic_update_slice(kv[1], v_bktd, (0, 0, slot, 0))
    return keys, values


def segment_positions(segment_ids_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """RoPE positions [B, T] that restart at 0 where each segment begins.

    A segment is a run of equal ids; a real token's position is the number of real tokens before
    it in its segment (the unpacked default, per packed example). Padding gets arbitrary positions.
    """
    real_before_bt = jnp.cumsum(mask_bt, axis=-1, dtype=jnp.int32) - mask_bt.astype(jnp.int32)
    first_column_b1 = jnp.ones_like(segment_ids_bt[:, :1], dtype=bool)
    starts_bt = jnp.concatenate(
        [first_column_b1, segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=-1
    )
    # real_before never decreases, so a running max picks its value at the latest segment start.
    segment_base_bt = jax.lax.cummax(jnp.where(starts_bt, real_before_bt, 0), axis=1)
    return real_before_bt - segment_base_bt


def project(layer: Any, x: jax.Array) -> jax.Array:
    """``layer(x)`` for a projection (Linear, LoRA-adapted, quantized) on [..., d_in], applied
    to the tokens flattened to [N, d_in].

    Why: the weight gradient of a projection on [B, T, d_in] is a dot contracting two axes, which
    XLA:CPU computes after transposing a whole activation ([B*T, d_out]) into a copy; on [N, d_in]
    it contracts one axis and needs no copy (docs/performance.md's CPU SFT step: 18% less CPU
    time for full fine-tuning, 41% with LoRA).
    """
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------- KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Functional KV cache: passed into the model and returned updated.

    ``keys``: one [B, K, D, S] array per layer, ``values``: one [B, K, S, D] array per layer
    (the layouts ``cached_attention``'s matmuls read as stored). ``key_mask`` [B, S]: slot holds a
    real token (False for padding and for slots not yet written). ``index``: next slot to write.
    ``real_tokens`` [B] int32: real tokens written so far (the next token's default position),
    kept so a decode step does no work that grows with the cache outside attention.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    index: jax.Array
    real_tokens: jax.Array

    @classmethod
    def create(
        cls, config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32
    ) -> KVCache:
        K, D, L = config.num_kv_heads, config.head_dim, config.num_layers
        return cls(
            keys=tuple(jnp.zeros((batch, K, D, max_len), dtype) for _ in range(L)),
            values=tuple(jnp.zeros((batch, K, max_len, D), dtype) for _ in range(L)),
            key_mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            real_tokens=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]


@dataclasses.dataclass
class LayerTaps:
    """Per-layer outputs a forward collects when asked (``CausalLM.__call__``'s
    ``attention_probs_layers`` / ``layer_hidden``); filled in place during the layer loop."""

    attention_probs_layers: tuple[int, ...] = ()
    hidden_layers: tuple[int, ...] = ()
    attention_probs: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    hidden: dict[int, jax.Array] = dataclasses.field(default_factory=dict)

    @property
    def requested(self) -> bool:
        return bool(self.attention_probs_layers or self.hidden_layers)

    def collect(self, layer: int, x_bte: jax.Array, probs: list[jax.Array]) -> None:
        if probs:
            self.attention_probs[layer] = probs[0]
        if layer in self.hidden_layers:
            self.hidden[layer] = x_bte


# --------------------------------------------------------------------------- modules


def _linear(
    d_in: int,
    d_out: int,
    axes: tuple[str, str],
    *,
    bias: bool,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": axes[1:]},
    )


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, offset: bool, param_dtype: Any, axis: str = "norm"):
        # Gemma stores the offset from 1, so its identity weight is 0.
        init = jnp.zeros if offset else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype), logical_axes=(axis,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.offset)


class Attention(nnx.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        c = config
        E, H, K, D = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dtypes = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(E, H * D, ("embed", "heads"), bias=c.qkv_bias, **dtypes)
        self.k_proj = _linear(E, K * D, ("embed", "kv_heads"), bias=c.qkv_bias, **dtypes)
        self.v_proj = _linear(E, K * D, ("embed", "kv_heads"), bias=c.qkv_bias, **dtypes)
        self.o_proj = _linear(H * D, E, ("heads", "embed"), bias=c.o_bias, **dtypes)
        if c.qk_norm:
            norm = dict(
                eps=c.rms_norm_eps, offset=c.norm_offset, param_dtype=param_dtype, axis="head_dim"
            )
            self.q_norm = RMSNorm(D, **norm)
            self.k_norm = RMSNorm(D, **norm)
        self.layer_type = c.layer_types[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, D
        self.qk_norm = c.qk_norm
        self.scale = c.attention_scale
        self.logit_cap = c.attn_logit_softcapping
        self.implementation = "auto"  # see attention_kernels.choose_kernel
        self.sliding_window = c.sliding_window if self.layer_type == "sliding_attention" else None
        self.inv_freq = tuple(
            float(f) for f in c.rope_for(self.layer_type).inv_freq(D)
        )  # static, hashable

    def __call__(
        self,
        x_bte: jax.Array,
        positions_bt: jax.Array,
        mask_bts: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        write_index: jax.Array | None = None,
        *,
        return_probs: bool = False,
        segments_bt: jax.Array | None = None,
        inv_freq: Any = None,
    ) -> tuple[Any, ...]:
        """(output [B, T, E], updated kv or None), plus with ``return_probs`` the attention
        probabilities [B, H, T, S] float32 (query head h = kv head h // G), e.g. for distillation.

        ``segments_bt`` (no cache): ``kernel_segment_ids`` of the call, which the splash kernel
        uses instead of ``mask_bts`` (the mask stays what every other kernel reads).
        ``inv_freq``: this layer's RoPE frequencies as an array (the scanned-layers path passes
        each layer's; default: the module's own)."""
        B, T, _ = x_bte.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = project(self.q_proj, x_bte).reshape(B, T, H, D)
        k = project(self.k_proj, x_bte).reshape(B, T, K, D)
        v = project(self.v_proj, x_bte).reshape(B, T, K, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        freq = np.asarray(self.inv_freq, np.float32) if inv_freq is None else inv_freq
        q, k = apply_rope(q, positions_bt, freq), apply_rope(k, positions_bt, freq)
        if kv is not None:  # generation: write this step's keys/values, attend over the cache
            assert write_index is not None
            cache_kv = write_kv(kv, k, v, write_index)
            prefill_kernel = self._prefill_kernel(q, cache_kv[1].shape[2], return_probs)
            if prefill_kernel is not None:
                keys_bskd, values_bskd = (
                    cache_kv[0].transpose(0, 3, 1, 2),
                    cache_kv[1].swapaxes(1, 2),
                )
                out = fused_attention(
                    q, keys_bskd, values_bskd, mask_bts, self.scale, prefill_kernel
                )
                return self.o_proj(out.reshape(B, T, H * D)), cache_kv
            attended = cached_attention(
                q, *cache_kv, mask_bts, self.scale, self.logit_cap, return_probs=return_probs
            )
            out, probs = attended if return_probs else (attended, None)
            projected = self.o_proj(out.reshape(B, T, H * D))
            return (projected, cache_kv, probs) if return_probs else (projected, cache_kv)
        new_kv = None
        if return_probs:
            out, probs_bhts = reference_attention(
                q, k, v, mask_bts, self.scale, self.logit_cap, return_probs=True
            )
            return project(self.o_proj, out.reshape(B, T, H * D)), new_kv, probs_bhts
        kernel = choose_kernel(
            self.implementation,
            dtype=q.dtype,
            q_len=T,
            kv_len=k.shape[1],
            cached=segments_bt is None,  # only a forward without a cache computes them
            logit_cap=self.logit_cap,
        )
        if kernel == "splash":
            assert segments_bt is not None
            out = splash_attention(
                q,
                k,
                v,
                segments_bt,
                self.scale,
                sliding_window=self.sliding_window,
                logit_cap=self.logit_cap,
            )
        elif kernel == "grouped":
            out = grouped_attention(q, k, v, mask_bts, self.scale)
        elif kernel == "reference":
            out = reference_attention(q, k, v, mask_bts, self.scale, self.logit_cap)
        else:
            out = fused_attention(q, k, v, mask_bts, self.scale, kernel)
        return project(self.o_proj, out.reshape(B, T, H * D)), new_kv

    def _prefill_kernel(self, q_bthd: jax.Array, slots: int, return_probs: bool) -> str | None:
        """The ``fused_attention`` kernel ("xla" or "cudnn") for a prompt's attention through the
        cache on GPU/TPU (T > 1), whose kernels keep the [B, H, T, S] scores out of memory (worth
        one transpose of the cache per prompt); None means ``cached_attention``: on CPU, where
        XLA's kernel materialises the scores anyway, for decode steps (T = 1, measured faster),
        and where only the reference maths apply (soft-capping, attention maps)."""
        T = q_bthd.shape[1]
        if T == 1 or return_probs or current_backend() == "cpu":
            return None
        kernel = choose_kernel(
            self.implementation,
            dtype=q_bthd.dtype,
            q_len=T,
            kv_len=slots,
            cached=True,
            logit_cap=self.logit_cap,
        )
        return kernel if kernel in ("xla", "cudnn") else None


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        E, F, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        dtypes = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(E, F, ("embed", "mlp"), bias=bias, **dtypes)
        self.up_proj = _linear(E, F, ("embed", "mlp"), bias=bias, **dtypes)
        self.down_proj = _linear(F, E, ("mlp", "embed"), bias=bias, **dtypes)
        self.act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = activation(self.act, project(self.gate_proj, x)) * project(self.up_proj, x)
        return project(self.down_proj, hidden)


class DecoderLayer(nnx.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
    ):
        c = config
        norm = dict(eps=c.rms_norm_eps, offset=c.norm_offset, param_dtype=param_dtype)
        self.self_attn = Attention(c, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, **norm)
        # Llama/Qwen: post_attention_layernorm is the pre-MLP norm. Gemma: it normalises the
        # attention output, and the MLP has its own pre/post norms ("sandwich").
        self.post_attention_layernorm = RMSNorm(c.hidden_size, **norm)
        if c.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
        self.sandwich = c.sandwich_norm
        self.sliding = c.layer_types[layer_idx] == "sliding_attention"

    def __call__(
        self,
        x,
        positions,
        full_mask,
        sliding_mask,
        kv=None,
        write_index=None,
        *,
        return_probs=False,
        segments=None,
        sliding=None,
        inv_freq=None,
    ):
        """(x, new_kv), plus the attention probabilities with ``return_probs`` (see Attention).

        ``sliding`` (a traced bool) and ``inv_freq``: this layer's attention type and RoPE
        frequencies as arrays, for the scanned-layers path whose one body serves every layer."""
        if sliding is None:
            mask = sliding_mask if self.sliding else full_mask
        else:
            mask = (
                full_mask if sliding_mask is None else jnp.where(sliding, sliding_mask, full_mask)
            )
        attn, new_kv, *probs = self.self_attn(
            self.input_layernorm(x),
            positions,
            mask,
            kv,
            write_index,
            return_probs=return_probs,
            segments_bt=segments,
            inv_freq=inv_freq,
        )
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, new_kv, *probs)


class Transformer(nnx.Module):
    """The HF ``model.`` part: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        c = config
        self.embed_tokens = nnx.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
            embedding_metadata={"logical_axes": ("vocab", "embed")},
        )
        self.layers = nnx.List(
            [
                DecoderLayer(c, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for i in range(c.num_layers)
            ]
        )
        self.norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, param_dtype=param_dtype
        )


class CausalLM(nnx.Module):
    """A causal LM: ``model(input_ids, attention_mask)`` gives float32 logits [B, T, V].

    ``dtype`` is the compute dtype (activations, matmuls, the KV cache); ``param_dtype`` the
    weights' storage dtype (default: ``dtype``). Mixed precision as in MaxText: float32 params
    with bfloat16 compute; ``nnx.Linear``/``nnx.Embed`` cast the weights to ``dtype`` when used.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.compute_dtype = jnp.dtype(dtype)
        self.model = Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = "none"  # see set_remat
        self.scan_layers = False  # see set_scan_layers
        if not config.tie_word_embeddings:
            self.lm_head = _linear(
                config.hidden_size,
                config.vocab_size,
                ("embed", "vocab"),
                bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

    @property
    def dtype(self) -> Any:
        """The compute dtype."""
        return self.compute_dtype

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.create(self.config, batch, max_len, self.dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        attention_probs_layers: tuple[int, ...] = (),
        layer_hidden: tuple[int, ...] = (),
    ):
        """Forward pass.

        input_ids [B, T] int; attention_mask [B, T] (1 = real token, 0 = padding; default all 1,
        or ``segment_ids != 0`` when those are given).
        positions [B, T]: RoPE positions; default: count of real tokens before each one (in the
        cache too), so left- and right-padded rows get 0, 1, 2, ... on their real tokens.
        segment_ids [B, T] int (packed rows; not with ``cache``): 0 = padding, 1..n = which example
        of the row; a token attends only within its segment and default positions restart at 0
        at each segment start, so each packed example is computed as if it were alone.
        cache: a KVCache; the T tokens are written at slots [cache.index, cache.index + T).
        last_only: logits (and hidden) for the last position only, [B, 1, ...] (generation's
        prefill: a [B, T, V] array would dwarf the rest for large vocabularies).
        attention_probs_layers, layer_hidden: layer indices whose attention probabilities
        [B, H, T, S] (float32) and outputs [B, T, E] (the residual stream after the layer) to
        return, e.g. for distillation; only those layers compute explicit probabilities.

        Returns logits [B, T, V] float32; with ``return_hidden`` also the final-norm output
        [B, T, E] (the lm_head input); with ``cache`` also the updated cache, in that order:
        ``logits``, ``(logits, hidden)``, ``(logits, cache)`` or ``(logits, hidden, cache)``.
        When layers are requested, a last element follows: ``{"attention_probs": {i: probs},
        "layer_hidden": {i: x}}``.

        Generation and training go through this method only, so wrappers that intercept
        ``__call__`` (qwix LoRA/quantization) apply to everything.
        """
        taps = LayerTaps(tuple(attention_probs_layers), tuple(layer_hidden))
        stray = sorted(
            {*taps.attention_probs_layers, *taps.hidden_layers} - set(range(len(self.model.layers)))
        )
        if stray:
            raise ValueError(
                f"layers {stray} out of range for a model with {len(self.model.layers)} layers"
            )
        hidden, new_cache = self.hidden_states(
            input_ids,
            attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            cache=cache,
            taps=taps,
        )
        if last_only:
            hidden = hidden[:, -1:]
        outputs: list[Any] = [self.logits(hidden)]
        if return_hidden:
            outputs.append(hidden)
        if cache is not None:
            outputs.append(new_cache)
        if taps.requested:
            outputs.append({"attention_probs": taps.attention_probs, "layer_hidden": taps.hidden})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        taps: LayerTaps | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm outputs [B, T, E] (apply ``logits`` to get logits) and the updated cache (or None).

        Arguments as for ``__call__``; ``taps`` (filled in place) collects per-layer outputs.
        Note: wrappers that intercept only ``__call__`` (qwix) do not see direct calls of this method.
        """
        if segment_ids is not None and cache is not None:
            # Cached slots carry no segment ids, and generation never packs several prompts per row.
            raise ValueError(
                "segment_ids (packed sequences) cannot be used with a KV cache; "
                "call the model without cache= for packed rows"
            )
        c = self.config
        B, T = input_ids.shape
        if attention_mask is not None:
            new_mask_bt = attention_mask.astype(bool)
        elif segment_ids is not None:
            new_mask_bt = segment_ids != 0
        else:
            new_mask_bt = jnp.ones((B, T), bool)
        if cache is not None:
            start = cache.index
            prior_bt = cache.real_tokens[:, None]
            key_mask_bs = jax.lax.dynamic_update_slice(cache.key_mask, new_mask_bt, (0, start))
        else:
            start = jnp.zeros((), jnp.int32)
            prior_bt = jnp.zeros((B, 1), jnp.int32)
            key_mask_bs = new_mask_bt
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids, new_mask_bt)
        elif positions is None:
            positions = jnp.maximum(prior_bt + jnp.cumsum(new_mask_bt, axis=-1) - 1, 0)
        q_slots_t = start + jnp.arange(T)
        sliding = c.sliding_window if "sliding_attention" in c.layer_types else None
        full_mask, sliding_mask = attention_masks(q_slots_t, key_mask_bs, sliding, segment_ids)
        # What the splash kernel reads instead of the masks (training and scoring only).
        segments = kernel_segment_ids(new_mask_bt, segment_ids) if cache is None else None

        x = self.model.embed_tokens(input_ids)
        if c.scale_embeddings:  # HF rounds the normaliser to the activation dtype
            x = x * jnp.asarray(c.hidden_size**0.5, dtype=x.dtype)
        new_keys, new_values = [], []
        if cache is None and self.scan_layers and not (taps is not None and taps.requested):
            scanned = _scan_layers(
                list(self.model.layers), self.remat, x, positions, full_mask, sliding_mask, segments
            )
            if scanned is not None:
                return self.model.norm(scanned), None
        for i, layer in enumerate(self.model.layers):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            wants_probs = taps is not None and i in taps.attention_probs_layers
            # Remat only where a backward pass gains from it, and not on a layer whose attention
            # maps are read (they come from the explicit path, outside the checkpointed call).
            if cache is None and self.remat != "none" and not wants_probs:
                x, _ = _remat_layer(self.remat)(
                    layer, x, positions, full_mask, sliding_mask, segments
                )
                if taps is not None:
                    taps.collect(i, x, [])
                continue
            x, new_kv, *probs = layer(
                x,
                positions,
                full_mask,
                sliding_mask,
                kv,
                start,
                return_probs=wants_probs,
                segments=segments,
            )
            if taps is not None:
                taps.collect(i, x, probs)
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        hidden = self.model.norm(x)
        if cache is None:
            return hidden, None
        index = (start + T).astype(jnp.int32)
        real_tokens = cache.real_tokens + jnp.sum(new_mask_bt, axis=-1, dtype=jnp.int32)
        return hidden, KVCache(tuple(new_keys), tuple(new_values), key_mask_bs, index, real_tokens)

    def logits(self, hidden_bte: jax.Array) -> jax.Array:
        """LM head (tied or not) and final soft-capping on final-norm outputs; float32."""
        head = self.model.embed_tokens.attend if self.config.tie_word_embeddings else self.lm_head
        logits = project(head, hidden_bte)  # flat tokens: no transposed [V, B*T] gradient copy
        return softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)


# --------------------------------------------------------------------------- rematerialisation

# spec.training.remat: "none" keeps every activation for the backward pass; "full" keeps only
# each layer's input and recomputes the layer; the others are jax.checkpoint_policies names.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _remat_layer(policy: str):
    """A decoder layer call, rematerialised per ``policy``, for training (no cache)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} unknown; known: {', '.join(REMAT_POLICIES)}")
    jax_policy = None if policy == "full" else getattr(jax.checkpoint_policies, policy)

    def call(layer, x, positions, full_mask, sliding_mask, segments=None):
        # jax.checkpoint on a pure function of the layer's state, not nnx.remat: nnx.remat writes
        # the state back to the module, which fails when the module was merged inside another
        # trace (the trainer merges it inside the micro-batch scan).
        graphdef, state = nnx.split(layer)

        def pure(state, x, positions, full_mask, sliding_mask, segments):
            layer = nnx.merge(graphdef, state)
            return layer(x, positions, full_mask, sliding_mask, segments=segments)

        return jax.checkpoint(pure, policy=jax_policy)(
            state, x, positions, full_mask, sliding_mask, segments
        )

    return call


def set_remat(model: CausalLM, policy: str) -> None:
    """Choose what the backward pass keeps (``REMAT_POLICIES``); generation is never affected."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} unknown; known: {', '.join(REMAT_POLICIES)}")
    model.remat = policy


def set_scan_layers(model: CausalLM, scan: bool) -> None:
    """Run the decoder layers of a forward without a KV cache (training, scoring) as one
    ``lax.scan`` body over their stacked weights (``spec.training.scanLayers``); see
    ``_scan_layers``. The parameters stay per layer, so checkpoints, LoRA/QLoRA and sharding are
    the same either way."""
    model.scan_layers = bool(scan)


def _layer_signature(layer: DecoderLayer) -> tuple[Any, ...]:
    """What a scan body cannot vary per layer: the state's structure, shapes and dtypes, and the
    static settings. A layer's attention type and RoPE frequencies are not in it: the body takes
    them as scanned arrays."""
    a = layer.self_attn
    state = nnx.state(layer)
    leaves = tuple((x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(state))
    return (
        jax.tree.structure(state),
        leaves,
        a.implementation,
        a.qk_norm,
        a.scale,
        a.logit_cap,
        (a.num_heads, a.num_kv_heads, a.head_dim),
        layer.sandwich,
        layer.mlp.act,
    )


def _scan_layers(
    layers: list[DecoderLayer],
    remat: str,
    x: jax.Array,
    positions: jax.Array,
    full_mask: jax.Array,
    sliding_mask: jax.Array | None,
    segments: jax.Array | None,
) -> jax.Array | None:
    """The decoder layers as one ``lax.scan`` over their stacked states: XLA compiles one layer
    instead of L, and remat (``jax.checkpoint`` around the body) keeps one layer's input per
    iteration. Each layer's attention type (Gemma 2/3's sliding/global alternation) and RoPE
    frequencies ride along as scanned arrays. The stacking is a copy of the layers' weights made
    inside the program (the parameters stay per layer). Returns None, and the caller runs the
    layers one by one, where one body cannot serve them all: layers that differ in structure or
    static settings, or sliding-window layers mixed with global ones under the splash kernel
    (whose window is static)."""
    first = _layer_signature(layers[0])
    if any(_layer_signature(layer) != first for layer in layers[1:]):
        return None
    flags = np.asarray([layer.sliding for layer in layers])
    mixed = bool(flags.any() and not flags.all())
    if mixed:
        a = layers[0].self_attn
        kernel = choose_kernel(
            a.implementation,
            dtype=x.dtype,
            q_len=x.shape[1],
            kv_len=x.shape[1],
            cached=segments is None,
            logit_cap=a.logit_cap,
        )
        if kernel == "splash":
            return None
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])
    inv_freqs = np.asarray([layer.self_attn.inv_freq for layer in layers], np.float32)
    per_layer = (stacked, jnp.asarray(flags), jnp.asarray(inv_freqs))

    def body(x: jax.Array, xs: Any) -> tuple[jax.Array, None]:
        state, sliding, inv_freq = xs
        layer = nnx.merge(graphdef, state)
        out, _ = layer(
            x,
            positions,
            full_mask,
            sliding_mask,
            segments=segments,
            sliding=sliding if mixed else None,
            inv_freq=inv_freq,
        )
        return out, None

    if remat != "none":
        policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, per_layer)
    return x


def set_attention(model: CausalLM, implementation: str) -> None:
    """Attention kernel of every layer: "auto", "xla", "cudnn" (``fused_attention``), "splash"
    (Pallas, TPU), "grouped" (``grouped_attention``, for XLA:CPU) or "reference"; see
    ``attention_kernels.choose_kernel``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention {implementation!r} unknown; known: {', '.join(IMPLEMENTATIONS)}"
        )
    for layer in model.model.layers:
        layer.self_attn.implementation = implementation


def create_model(
    config: ModelConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
) -> CausalLM:
    """A randomly initialised model (normal(0.02) weights, identity norms).

    ``dtype``: compute dtype; ``param_dtype``: the weights' dtype (default: ``dtype``).
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    return CausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
