"""Splash attention under ``shard_map`` on a (data, fsdp, tensor) mesh of 4 fake CPU devices, in
Pallas interpret mode, against ``reference_attention``: outputs and gradients, and a whole model.

XLA_FLAGS must be set before JAX initialises, so the checks run in a fresh interpreter: the test
runs this file as a script with --xla_force_host_platform_device_count=4.
"""

from __future__ import annotations


def test_splash_under_shard_map_equals_the_reference_on_four_cpu_devices(run_on_cpu_devices):
    run_on_cpu_devices(__file__, "sharded splash checks passed")


def _main() -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from posttrain.trainer.models import (
        attention_kernels as ak,
    )
    from posttrain.trainer.models import (
        builtin_config,
        create_model,
        make_mesh,
        set_attention,
        shard_model,
    )
    from posttrain.trainer.models.transformer import attention_masks, reference_attention

    assert jax.device_count() == 4, jax.devices()
    start = time.time()
    T, B, D = ak.SPLASH_BLOCK, 4, 16

    # What each shard gets: batch over (data, fsdp), heads over tensor only when the kv heads
    # split too (grouped-query), the sequence whole.
    assert ak.splash_specs(make_mesh(data=4, fsdp=1), B, 4, 2) == (
        P("data", None, None, None),
        P("data", None, None, None),
        P("data", None),
    )
    assert ak.splash_specs(make_mesh(data=2, fsdp=1, tensor=2), B, 4, 2) == (
        P("data", None, "tensor", None),
        P("data", None, "tensor", None),
        P("data", None),
    )
    assert ak.splash_specs(make_mesh(data=1, fsdp=2, tensor=2), B, 4, 1)[0] == P(
        "fsdp", None, None, None
    )
    assert ak.splash_specs(make_mesh(data=2, fsdp=2), 2, 4, 2)[0] == P("data", None, None, None)

    # "auto" picks splash on a multi-device TPU only with the mesh in scope (the shard_map's).
    choose = dict(dtype=jnp.bfloat16, q_len=T, kv_len=T, cached=False, logit_cap=None)
    assert ak.choose_kernel("auto", backend="tpu", devices=4, **choose) == "xla"
    with jax.set_mesh(make_mesh(data=4, fsdp=1)):
        assert ak.current_mesh() is not None
        assert ak.choose_kernel("auto", backend="tpu", devices=4, **choose) == "splash"
        assert ak.choose_kernel("auto", backend="cpu", devices=4, **choose) == "grouped"

    # Record what the per-shard kernel sees, to check that the call really is split.
    seen: list[tuple[int, ...]] = []
    local = ak._splash_local

    def spy(q, *args, **kwargs):
        seen.append(q.shape)
        return local(q, *args, **kwargs)

    ak._splash_local = spy

    rng = np.random.default_rng(0)
    mask = np.ones((B, T), np.int32)
    mask[0, :10] = 0  # left padding
    mask[1, -7:] = 0  # right padding
    segments = np.ones((B, T), np.int32)
    segments[2, 60:] = 2  # two packed examples
    segments[3, 30:] = 2
    segments[3, 90:] = 3
    segments[1, -7:] = 0
    mask_j, seg_j = jnp.asarray(mask), jnp.asarray(segments)

    cases = [
        # mesh, (H, K), window, cap, packed, the shard's q shape
        (dict(data=4, fsdp=1), (4, 2), None, None, True, (1, T, 4, D)),
        (dict(data=2, fsdp=1, tensor=2), (4, 2), 32, None, False, (2, T, 2, D)),
        # one kv head does not split over tensor: every shard runs all heads
        (dict(data=1, fsdp=2, tensor=2), (4, 1), None, 30.0, True, (2, T, 4, D)),
    ]
    for mesh_sizes, (H, K), window, cap, packed, local_shape in cases:
        q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
        seg = seg_j if packed else None
        ids = ak.kernel_segment_ids(mask_j, seg)
        full, sliding = attention_masks(jnp.arange(T), mask_j, window, seg)
        bts = full if window is None else sliding
        real = np.asarray(ids) > 0
        # Cotangents only on real queries: padding queries' outputs are ignored downstream.
        weights = jnp.broadcast_to(
            jnp.asarray(real, jnp.float32)[:, :, None, None] * jnp.linspace(0.5, 1.5, D), q.shape
        )

        def out_and_grads(fn, q, k, v, weights=weights):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(weights)

        mesh = make_mesh(**mesh_sizes)
        seen.clear()
        with jax.set_mesh(mesh):
            batch = NamedSharding(mesh, P(("data", "fsdp")))
            placed = [jax.device_put(x, batch) for x in (q, k, v, ids)]
            splash = jax.jit(
                lambda q, k, v, ids, window=window, cap=cap: out_and_grads(
                    lambda q, k, v: ak.splash_attention(
                        q, k, v, ids, 0.25, sliding_window=window, logit_cap=cap
                    ),
                    q,
                    k,
                    v,
                )
            )
            got, got_grads = splash(*placed)
        assert seen and all(shape == local_shape for shape in seen), (mesh_sizes, seen)
        want, want_grads = out_and_grads(
            lambda q, k, v, bts=bts, cap=cap: reference_attention(q, k, v, bts, 0.25, cap), q, k, v
        )
        np.testing.assert_allclose(
            np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, err_msg=str(mesh_sizes)
        )
        for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), atol=1e-4, err_msg=f"d{name} {mesh_sizes}"
            )
        print(
            "ok", round(time.time() - start, 1), mesh_sizes, (H, K), window, cap, packed, flush=True
        )

    # A whole model (4 query / 2 kv heads) forced to splash on fsdp=2 x tensor=2 == reference.
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    model = shard_model(create_model(builtin_config("tiny", vocab_size=64), rngs=nnx.Rngs(0)), mesh)
    tokens = jnp.asarray(rng.integers(1, 64, size=(B, T)), jnp.int32)
    forward = nnx.jit(lambda m, x, mask, seg: m(x, mask, segment_ids=seg))
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        args = [jax.device_put(x, batch) for x in (tokens, mask_j, seg_j)]
        set_attention(model, "reference")
        want = np.asarray(forward(model, *args))
        set_attention(model, "splash")
        seen.clear()
        got = np.asarray(forward(model, *args))
    assert seen and all(shape == (2, T, 2, D) for shape in seen), seen
    real = np.asarray(ak.kernel_segment_ids(mask_j, seg_j)) > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
    print("sharded splash checks passed")


if __name__ == "__main__":
    _main()
