"""LoRA and QLoRA on the NNX model: adapters from flax (``nnx.LoRA``/``nnx.LoRAParam``), the frozen
quantized base from qwix's quantize/dequantize (int8, or 4-bit NormalFloat ``nf4``).

``apply_peft(model, lora, quantization)`` swaps, in place, each target projection (an
``nnx.Linear`` named ``q_proj`` ... ``down_proj``) for an ``Adapted`` module: ``base(x) + (alpha /
rank) * x @ A @ B``. B starts at zero, so a fresh adapter leaves the model's outputs unchanged.
With quantization every projection's base becomes a ``QuantizedLinear`` whose weights stay
quantized (``QuantizedWeight`` variables, not Params: never trained, never in the optimizer);
it dequantizes blockwise on the fly inside the jitted step. The optimizer's ``wrt`` is then
``nnx.LoRAParam`` only.

Dtypes (mixed precision): adapters are stored in ``param_dtype`` (float32 master weights, so small
updates are not rounded away) and computed in the base layer's compute dtype; the frozen base
keeps the dtype it was built with (the loop builds it in the compute dtype) or stays quantized.
Adapter A starts as PEFT's does (``kaiming_uniform_(a=sqrt(5))``: uniform in +-1/sqrt(d_in)).

Why a small wrapper instead of qwix's ``LoraProvider``: qwix intercepts the model's calls
and needs a traced example input to create its params, which would also wrap our sampling
and attention einsums; a named module keeps the parameter tree readable (``q_proj.lora.lora_a``),
lets ``merge_peft`` rebuild plain ``nnx.Linear`` layers for ``save_pretrained``, and still uses
qwix's nf4/int8 numerics for the quantized base.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from posttrain.api.v1alpha1 import LoraSpec, QuantizationSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QTYPES = {"int8": jnp.int8, "nf4": "nf4"}
# PEFT initialises lora_A with torch's kaiming_uniform_(a=sqrt(5)): gain^2 = 2 / (1 + 5), bound
# gain * sqrt(3 / fan_in) = sqrt(1 / fan_in); variance_scaling(1/3, fan_in, uniform) is that bound.
LORA_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class QuantizedWeight(nnx.Variable):
    """A frozen quantized tensor (codes or scales): a Variable, not a Param, so never trained."""


class QuantizedLinear(nnx.Module):
    """y = x @ dequantize(W) + b, W stored as qwix codes [in, out] plus per-block scales."""

    def __init__(self, linear: nnx.Linear, quantization: QuantizationSpec):
        kernel = linear.kernel[...]
        d_in = kernel.shape[0]
        if d_in % quantization.block_size:  # apply_peft reports this with the field name first
            raise ValueError(f"block size {quantization.block_size} does not divide {d_in}")
        q = qwix.quantize(
            kernel,
            QTYPES[quantization.type],
            channelwise_axes=(1,),
            tiled_axes={0: quantization.block_size},
        )
        axes = linear.kernel.get_metadata().get("logical_axes")
        self.codes = QuantizedWeight(q.qvalue, logical_axes=axes)
        self.scales = QuantizedWeight(q.scale)
        self.qtype = QTYPES[quantization.type]
        self.bias = linear.bias  # frozen with the rest of the base (not a LoRAParam)
        self.compute_dtype = linear.dtype or kernel.dtype
        self.features = tuple(kernel.shape)
        self.axes = axes

    def dequantized_kernel(self, dtype: Any = None) -> jax.Array:
        q = qwix.QArray(self.codes[...], self.scales[...], None, self.qtype)
        return qwix.dequantize(q).astype(dtype or self.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.dequantized_kernel()
        return y + self.bias[...] if self.bias is not None else y

    def to_linear(self) -> nnx.Linear:
        """A plain float32 nnx.Linear with the dequantized weights (for the export)."""
        d_in, d_out = self.features
        linear = nnx.eval_shape(
            lambda: nnx.Linear(
                d_in,
                d_out,
                use_bias=self.bias is not None,
                dtype=self.compute_dtype,
                param_dtype=jnp.float32,
                rngs=nnx.Rngs(0),
                kernel_metadata={"logical_axes": self.axes} if self.axes else {},
                bias_metadata={"logical_axes": self.axes[1:]} if self.axes else {},
            )
        )
        linear.kernel.set_value(self.dequantized_kernel(jnp.float32))
        if self.bias is not None:
            if linear.bias is None:  # use_bias=True above: unreachable unless flax changes
                raise RuntimeError("nnx.Linear(use_bias=True) was built without a bias")
            linear.bias.set_value(self.bias[...].astype(jnp.float32))
        return linear


class Adapted(nnx.Module):
    """base(x) + (alpha / rank) * lora(x); base is an nnx.Linear or a QuantizedLinear."""

    def __init__(
        self,
        base: nnx.Linear | QuantizedLinear,
        d_in: int,
        d_out: int,
        lora: LoraSpec,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.base = base
        self.lora = nnx.LoRA(
            d_in,
            lora.rank,
            d_out,
            dtype=dtype,
            param_dtype=param_dtype,
            a_initializer=LORA_A_INIT,
            rngs=rngs,
        )
        self.scale = lora.alpha / lora.rank

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.scale * self.lora(x).astype(x.dtype)

    def merged_linear(self) -> nnx.Linear:
        """The base with the adapter folded in, in float32 (the export casts to what it writes)."""
        linear = self.base.to_linear() if isinstance(self.base, QuantizedLinear) else self.base
        f32 = jnp.float32
        delta = self.scale * (self.lora.lora_a[...].astype(f32) @ self.lora.lora_b[...].astype(f32))
        linear.kernel.set_value(linear.kernel[...].astype(f32) + delta)
        return linear


Projection = nnx.Linear | QuantizedLinear | Adapted  # what a projection slot can hold


def _projection_slots(model: nnx.Module) -> list[tuple[nnx.Module, str, Projection]]:
    """(parent, attribute, child) for every projection layer, collected before any change."""
    slots: list[tuple[nnx.Module, str, Projection]] = []
    for _, module in nnx.iter_modules(model):
        for name in PROJECTIONS:
            child = getattr(module, name, None)
            if isinstance(child, (nnx.Linear, QuantizedLinear, Adapted)):
                slots.append((module, name, child))
    return slots


def apply_peft(
    model: nnx.Module,
    lora: LoraSpec | None,
    quantization: QuantizationSpec | None = None,
    *,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
) -> nnx.Module:
    """Wrap the model's projections (in place) for LoRA or QLoRA; returns the model.

    Adapters are stored in ``param_dtype`` and computed in each layer's compute dtype.
    """
    if lora is None:
        if quantization is not None:
            raise ValueError(
                "spec.model.quantization needs spec.model.lora (a quantized base is frozen)"
            )
        return model
    slots = _projection_slots(model)
    if not slots:
        raise ValueError(f"the model has none of the projections {PROJECTIONS} to adapt")
    linears: list[tuple[nnx.Module, str, nnx.Linear]] = []
    for parent, name, child in slots:
        if not isinstance(child, nnx.Linear):
            raise ValueError(
                f"{name} is already a {type(child).__name__}: apply_peft adapts a model only once"
            )
        linears.append((parent, name, child))
    if quantization is not None:
        check_block_size(
            quantization.block_size, [(n, lin.kernel.shape[0]) for _, n, lin in linears]
        )
    for parent, name, linear in linears:
        d_in, d_out = linear.kernel.shape
        dtype = linear.dtype or linear.kernel.dtype
        base: nnx.Linear | QuantizedLinear = (
            QuantizedLinear(linear, quantization) if quantization else linear
        )
        if name in lora.targets:
            adapted = Adapted(
                base, d_in, d_out, lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            setattr(parent, name, adapted)
        else:
            setattr(parent, name, base)
    return model


def check_block_size(block_size: int, inputs: list[tuple[str, int]]) -> None:
    """Blocks tile each projection's input axis, so blockSize must divide every input dimension."""
    bad = sorted({(name, d_in) for name, d_in in inputs if d_in % block_size})
    if not bad:
        return
    common = math.gcd(*(d_in for _, d_in in inputs))
    fits = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if common % b == 0]
    raise ValueError(
        f"spec.model.quantization.blockSize: {block_size} does not divide the input dimension of "
        + ", ".join(f"{name} ({d_in})" for name, d_in in bad)
        + "; blocks tile each projection's input axis, so use a size that divides every one, such as "
        + (", ".join(map(str, fits)) if fits else f"none from 16 up divides them (gcd {common})")
    )


def merge_peft(model: nnx.Module) -> nnx.Module:
    """Fold adapters (and dequantize bases) back into plain nnx.Linear layers, in place."""
    for parent, name, child in _projection_slots(model):
        if isinstance(child, Adapted):
            setattr(parent, name, child.merged_linear())
        elif isinstance(child, QuantizedLinear):
            setattr(parent, name, child.to_linear())
    return model


def trainable_filter(lora: LoraSpec | None) -> Any:
    """What the optimizer updates: adapters only with LoRA, every Param otherwise."""
    return nnx.LoRAParam if lora is not None else nnx.Param


def nbytes(tree: Any) -> int:
    """Bytes of a pytree of arrays, counting sub-byte types (int4, nf4 codes) at their bit width."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "dtype"):
            continue
        bits = (
            jnp.iinfo(leaf.dtype).bits
            if jnp.issubdtype(leaf.dtype, jnp.integer)
            else leaf.dtype.itemsize * 8
        )
        total += leaf.size * bits // 8
    return total
