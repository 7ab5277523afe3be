"""Data-parallel generation on 4 fake CPU devices: same tokens as one device, rows split per device.

XLA_FLAGS must be set before JAX initialises, so the checks run in a fresh interpreter: the test
runs this file as a script with --xla_force_host_platform_device_count=4.
"""

from __future__ import annotations


def test_data_parallel_generation_on_four_cpu_devices(run_on_cpu_devices):
    run_on_cpu_devices(__file__, "sharded sampling checks passed", timeout=600)


def _main() -> None:
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from posttrain.trainer.models import builtin_config, create_model, make_mesh, shard_model
    from posttrain.trainer.sampling import generate, lower_generate
    from posttrain.trainer.sampling.sampler import data_parallel_size

    assert jax.device_count() == 4, jax.devices()
    config = builtin_config("tiny", vocab_size=64)

    def model_on(mesh):
        model = create_model(config, rngs=nnx.Rngs(0))  # the same float32 weights every time
        return model if mesh is None else shard_model(model, mesh)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 64, size=int(n)).tolist() for n in rng.integers(2, 12, size=8)]
    sampling = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    one = generate(model_on(None), prompts, **sampling)
    tokens = np.asarray(one.tokens)
    assert len(np.unique(tokens)) > 10  # really sampled

    def same(out, rows=slice(None), what=""):
        np.testing.assert_array_equal(np.asarray(out.tokens), tokens[rows], err_msg=what)
        np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(one.mask)[rows])
        for field in ("logprobs", "sampling_logprobs"):
            np.testing.assert_allclose(
                np.asarray(getattr(out, field)),
                np.asarray(getattr(one, field))[rows],
                atol=1e-5,
                err_msg=f"{what} {field}",
            )

    for shape in ({"data": 4, "fsdp": 1}, {"data": 2, "fsdp": 2}, {"data": 1, "fsdp": 2}):
        tensor = 4 // (shape["data"] * shape["fsdp"])
        mesh = make_mesh(**shape, tensor=tensor)
        model = model_on(mesh)
        dp = data_parallel_size(mesh)
        out = generate(model, prompts, **sampling)  # the mesh is the weights'
        same(out, what=str(dict(mesh.shape)))
        # Each device holds 8 / dp of the rows.
        assert isinstance(out.tokens.sharding, NamedSharding)
        assert out.tokens.sharding.shard_shape(out.tokens.shape)[0] == 8 // dp, out.tokens.sharding
        # Chunks of dp rows: the same tokens, one chunk's cache at a time.
        same(generate(model, prompts, **sampling, chunk_rows=dp), what=f"chunks of {dp}")
        # 6 rows do not divide over 4 devices: padded rows are generated and dropped.
        same(generate(model, prompts[:6], **sampling), rows=slice(0, 6), what="6 rows")

    # Runs of one prompt prefilled once (GRPO's groups), one run per device: the same tokens.
    runs = [p for p in prompts[:4] for _ in range(2)]
    want_runs = generate(model_on(None), runs, **sampling)
    got_runs = generate(model_on(make_mesh(data=4, fsdp=1)), runs, **sampling, prompt_group=2)
    np.testing.assert_array_equal(np.asarray(got_runs.tokens), np.asarray(want_runs.tokens))
    np.testing.assert_allclose(
        np.asarray(got_runs.sampling_logprobs), np.asarray(want_runs.sampling_logprobs), atol=1e-5
    )

    greedy = dict(max_new_tokens=12)
    want = np.asarray(generate(model_on(None), prompts, **greedy).tokens)
    got = generate(model_on(make_mesh(data=2, fsdp=2)), prompts, **greedy, chunk_rows=4)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)

    # The rollout program's per-device temporaries shrink with the data-parallel size and with
    # chunking (XLA's memory analysis of the compiled program, as `posttrain plan` reads it).
    def temp_bytes(mesh, rows, chunk_rows=None):
        model = model_on(mesh)
        graphdef, state = nnx.split(model)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        lowered = lower_generate(
            graphdef, abstract, shardings, mesh, rows, 64, 64, 1.0, None, None, chunk_rows
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    one_device = make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    sizes = {
        "1 device": temp_bytes(one_device, 64),
        "data=4": temp_bytes(make_mesh(data=4, fsdp=1), 64),
        "data=2 fsdp=2": temp_bytes(make_mesh(data=2, fsdp=2), 64),
        "data=4, chunks of 16": temp_bytes(make_mesh(data=4, fsdp=1), 64, 16),
        "1 device, chunks of 16": temp_bytes(one_device, 64, 16),
    }
    print({k: f"{v / 2**20:.2f} MiB" for k, v in sizes.items()})
    assert sizes["data=4"] < sizes["1 device"] / 3, sizes
    assert sizes["data=2 fsdp=2"] < sizes["1 device"] / 3, sizes
    assert sizes["data=4, chunks of 16"] < sizes["data=4"] / 2, sizes
    assert sizes["1 device, chunks of 16"] < sizes["1 device"] / 2, sizes
    print("sharded sampling checks passed")


if __name__ == "__main__":
    _main()
