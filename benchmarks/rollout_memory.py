"""Per-device rollout temporaries of a job's sampler program: prompts replicated vs data-parallel.

    python -P benchmarks/rollout_memory.py examples/grpo-job.yaml [chunk_rows ...]

Builds the job's policy abstractly as `posttrain plan` does (its dtypes, LoRA, the weights
sharded as trained) on simulated host devices, one per chip, and compiles the rollout for
batchSize x numGenerations prompts of maxPromptLength + maxNewTokens tokens three ways: the
prompts replicated (what `plan` compiled before data-parallel rollouts), the rows sharded over
(data, fsdp) with `sampling.lower_generate`, and that in chunks of each given `chunk_rows`.
Prints XLA's temporaries per device (its memory analysis), in GiB.
"""

from __future__ import annotations

import sys
import time


def main(path: str, chunks: list[int]) -> None:
    from posttrain.api import load_documents, parse_job
    from posttrain.commands import plan as planlib

    job = parse_job(load_documents(path)[0], source=path)
    devices = planlib.chip_count(job.spec.resources)
    planlib._simulate_devices(devices)

    import jax
    from flax import nnx

    from posttrain.trainer import peft
    from posttrain.trainer.loop import model_dtypes
    from posttrain.trainer.models import ModelConfig, create_model, make_mesh
    from posttrain.trainer.sampling import lower_generate

    spec = job.spec
    config = ModelConfig.from_hf(planlib.model_config_json(spec.model.base, None))
    dtype, base_dtype, master = model_dtypes(spec.model)
    m = spec.training.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[:devices])
    shapes = planlib.job_shapes(spec)

    def build():
        model = create_model(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=base_dtype)
        peft.apply_peft(
            model, spec.model.lora, spec.model.quantization, rngs=nnx.Rngs(1), param_dtype=master
        )
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    state_sh = planlib._state_shardings(state, mesh)
    g, rows = shapes.sampling, shapes.rollout_rows
    print(f"{path}: {devices} devices, mesh {dict(mesh.shape)}, {rows} rows, "
          f"{shapes.prompt_len} + {g.max_new_tokens} tokens")  # fmt: skip

    def report(name: str, compile_fn) -> None:
        started = time.perf_counter()
        temp = compile_fn()
        print(
            f"  {name:36s} {temp / 2**30:8.2f} GiB per device ({time.perf_counter() - started:.0f} s)"
        )

    report(
        "prompts replicated (before)",
        lambda: planlib._compile_rollout(
            shapes, graphdef, state, state_sh, mesh, config.vocab_size
        ),
    )
    top_p = g.top_p if g.top_p < 1.0 else None
    for chunk in [None, *chunks]:
        lowered = lower_generate(
            graphdef, state, state_sh, mesh, rows, shapes.prompt_len, g.max_new_tokens,
            g.temperature, g.top_k, top_p, chunk,
        )  # fmt: skip
        name = "rows over (data, fsdp)" + (f", chunks of {chunk}" if chunk else "")
        report(name, lambda lowered=lowered: planlib._peak_bytes(lowered.compile()))


if __name__ == "__main__":
    main(sys.argv[1], [int(c) for c in sys.argv[2:]])
