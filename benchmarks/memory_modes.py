"""Memory of full fine-tuning, LoRA and QLoRA (int8, nf4): parameters + optimizer state, measured.

Builds the model the way the trainer does (``create_model`` + ``peft.apply_peft`` with the dtypes
of ``loop.model_dtypes``: float32 master weights, a LoRA base in the compute dtype), splits it
into what trains and what stays frozen (``peft.trainable_filter``), initialises the optimizer
the loop would use (AdamW), and sums the bytes of the real arrays. 4-bit codes count 4 bits each
(``peft.nbytes``); on CPU JAX stores them one per byte, on TPU/GPU packed.

    .venv/bin/python benchmarks/memory_modes.py              # a ~40M-parameter Llama-style model
    .venv/bin/python benchmarks/memory_modes.py --preset small
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

from posttrain.api.v1alpha1 import LoraSpec, ModelSpec, QuantizationSpec, TrainingSpec
from posttrain.trainer import peft
from posttrain.trainer.loop import model_dtypes
from posttrain.trainer.loop_optim import optimizer
from posttrain.trainer.models import builtin_config, create_model

PRESETS: dict[str, dict[str, int]] = {
    # Overrides of the built-in "small" config (trainer/models/config.py).
    "small": dict(vocab_size=100),
    # Llama-style shapes: vocab, hidden, intermediate, layers, heads, kv heads, head dim
    "llama-40m": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
    ),
}
MODES = {
    "full": (None, None),
    "lora": (LoraSpec(rank=16, alpha=32), None),
    "qlora-int8": (LoraSpec(rank=16, alpha=32), QuantizationSpec(type="int8", block_size=64)),
    "qlora-nf4": (LoraSpec(rank=16, alpha=32), QuantizationSpec(type="nf4", block_size=64)),
}


def measure(preset: str, mode: str, dtype: str, param_dtype: str) -> dict[str, float]:
    lora, quant = MODES[mode]
    config = builtin_config("small", **PRESETS[preset])
    spec = ModelSpec(base="builtin:small", dtype=dtype, param_dtype=param_dtype, lora=lora)
    compute, base, master = model_dtypes(spec)  # the dtypes build_model uses
    model = create_model(config, rngs=nnx.Rngs(0), dtype=compute, param_dtype=base)
    peft.apply_peft(model, lora, quant, rngs=nnx.Rngs(1), param_dtype=master)
    _, trainable, frozen = nnx.split(model, peft.trainable_filter(lora), ...)
    opt_state = optimizer(TrainingSpec(steps=1)).init(trainable)
    mib = 1 / 2**20
    t, f, o = peft.nbytes(trainable), peft.nbytes(frozen), peft.nbytes(opt_state)
    return {
        "trainable_params": sum(x.size for x in jax.tree.leaves(trainable)),
        "trainable_mib": t * mib,
        "frozen_mib": f * mib,
        "optimizer_mib": o * mib,
        "total_mib": (t + f + o) * mib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-40m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    rows = {mode: measure(args.preset, mode, args.dtype, args.param_dtype) for mode in MODES}
    total_params = rows["full"]["trainable_params"]
    print(
        f"model {args.preset} ({total_params / 1e6:.1f}M parameters), compute {args.dtype}, "
        f"paramDtype {args.param_dtype}, AdamW, LoRA rank 16 on all 7 projections"
    )
    print(
        "| mode | trainable params | trainable MiB | frozen MiB | optimizer state MiB | total MiB | vs full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    full = rows["full"]["total_mib"]
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['trainable_params']:,} | {r['trainable_mib']:.1f} | {r['frozen_mib']:.1f} | "
            f"{r['optimizer_mib']:.1f} | {r['total_mib']:.1f} | {r['total_mib'] / full:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
