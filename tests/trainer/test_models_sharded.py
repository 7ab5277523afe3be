"""Sharded == unsharded on a (data, fsdp, tensor) mesh of 4 fake CPU devices.

XLA_FLAGS must be set before JAX initialises, so the checks run in a fresh interpreter: the test
runs this file as a script with --xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

from pathlib import Path

HF_REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "hf-reference"


def test_sharded_equals_unsharded_on_four_cpu_devices(run_on_cpu_devices):
    run_on_cpu_devices(__file__, "sharded checks passed")


def _main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from posttrain.trainer.models import (
        builtin_config,
        create_model,
        load_pretrained,
        logical_to_spec,
        make_mesh,
        param_shardings,
        shard_model,
    )
    from posttrain.trainer.sampling import generate

    assert jax.device_count() == 4, jax.devices()
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 4, "tensor": 1}

    # The rules table: meanings to mesh axes; axes that do not divide a dimension are dropped.
    assert logical_to_spec(("embed", "heads"), (64, 64), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (384, 64), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
    assert logical_to_spec(("norm",), (64,), mesh) == P(None)

    forward = nnx.jit(lambda m, x, mask: m(x, mask))
    for name in ("gemma3-text", "qwen3-qknorm"):
        ref = np.load(HF_REFERENCE / name / "reference.npz")
        plain = load_pretrained(HF_REFERENCE / name)
        sharded = load_pretrained(HF_REFERENCE / name, mesh=mesh)
        attn = sharded.model.layers[0].self_attn
        assert attn.q_proj.kernel.get_value().sharding.spec == P("fsdp", "tensor"), (
            attn.q_proj.kernel.get_value().sharding
        )
        assert attn.o_proj.kernel.get_value().sharding.spec == P("tensor", "fsdp")
        assert sharded.model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
        ids = jax.device_put(
            jnp.asarray(ref["padded_input_ids"]), jax.NamedSharding(mesh, P(("data", "fsdp")))
        )
        mask = jnp.asarray(ref["padded_attention_mask"])
        want = np.asarray(forward(plain, jnp.asarray(ref["padded_input_ids"]), mask))
        got = np.asarray(forward(sharded, ids, mask))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        valid = ref["padded_attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], ref["padded_logits"][valid], atol=1e-4, rtol=1e-4)
        out = generate(sharded, ref["prompt_ids"], max_new_tokens=12)
        np.testing.assert_array_equal(np.asarray(out.tokens), ref["greedy_ids"])

    # shard_model moves an existing model's params to the shardings param_shardings names.
    model = create_model(builtin_config("tiny", vocab_size=128), rngs=nnx.Rngs(1))
    ids = jnp.arange(32).reshape(4, 8)
    before = np.asarray(forward(model, ids, None))
    shard_model(model, mesh)
    specs = param_shardings(model, mesh)
    assert specs["model"]["layers"][0]["mlp"]["down_proj"]["kernel"].get_value().spec == P(
        "tensor", "fsdp"
    )
    assert model.model.layers[0].mlp.up_proj.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(forward(model, ids, None)), before, atol=1e-5, rtol=1e-5)
    print("sharded checks passed")


if __name__ == "__main__":
    _main()
