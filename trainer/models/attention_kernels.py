"""Which attention kernel runs, and the Pallas splash-attention kernel for TPUs.

``choose_kernel`` turns a layer's ``implementation`` ("auto", "xla", "cudnn", "splash",
"grouped", "reference") into the kernel for this call:

- "auto": splash on a TPU backend when the call is supported (below), cuDNN on a GPU for 16-bit
  activations, ``grouped_attention`` (its backward written for XLA:CPU's layouts) on a CPU
  backend, else XLA (``jax.nn.dot_product_attention``); attention soft-capping (Gemma 2) goes to
  splash when supported, else to the plain-XLA reference.
- "splash" forces splash where supported (on a CPU in Pallas interpret mode, for tests; not on a
  GPU, which has no such kernel) and falls back as "auto" does otherwise.

The backend is JAX's default, or the one ``target_backend`` names while tracing: ``posttrain
plan`` traces on its CPU host the step that libtpu compiles for a TPU.

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) takes structured masks,
not a [B, T, S] boolean array: the causal mask (``CausalMask``) or, on sliding-window layers,
``LocalMask`` with window (w - 1, 0), and ``SegmentIds`` that carry both packed segments and
padding (padding tokens get segment 0, so real tokens never see them). It supports
grouped-query attention (K kv heads dividing H query heads) and attention-logit soft-capping.
It is used only when:

- there is no KV cache (training, scoring): cached attention is generation's, whose query slots
  start at the cache index and whose keys include slots never written;
- the sequence length is a multiple of ``SPLASH_BLOCK`` (the kernel's tile);
- "auto" only: one device, or a multi-device mesh in scope (``current_mesh``: ``jax.set_mesh``
  outside a jit, ``jax.sharding.use_abstract_mesh`` inside one; the trainer's jitted steps trace
  under their job's mesh, ``placement.mesh_in_scope``).

Multi-chip meshes: the Pallas call has no SPMD partitioning rule, so left to XLA it would gather
q, k and v onto every device. With a mesh set, ``splash_attention`` runs the kernel per shard
under ``jax.shard_map`` (``splash_specs``): the batch over the data-parallel axes (data, fsdp)
that divide it, the query and kv heads over tensor when both divide by it (otherwise every
shard runs all heads, replicated over tensor: grouped-query attention maps query head h to kv
head h // (H / K), which holds per shard only when both are split alike), the sequence whole.
The kernel is built per shard for its local head count. Without a mesh in scope, "auto"
keeps XLA on several devices and a forced "splash" runs unsharded, gathered by XLA.

Not run on a TPU by this repository's tests: they run the same kernel in Pallas interpret mode on
the CPU and compare it with ``reference_attention`` (``tests/trainer/test_attention_kernels.py``),
also under ``shard_map`` on simulated 4-device CPU meshes (data=4, data=2 x tensor=2,
fsdp=2 x tensor=2; outputs, gradients, heads split and replicated over tensor, and a whole
model: ``tests/trainer/test_attention_kernels_sharded.py``), and the trainer's SFT steps on
such a mesh (``tests/trainer/test_splash_in_training.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from posttrain.trainer.models.sharding import logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "grouped", "reference")
SPLASH_BLOCK = 128  # the kernel's query and key tile, forward and backward (its default)


def kernel_segment_ids(mask_bt: jax.Array, segment_ids_bt: jax.Array | None) -> jax.Array:
    """Segment id per token for the kernel, int32 [B, T]: the packed example's id (1 without
    packing) on real tokens, 0 on padding, so a real query never attends to padding or to
    another example. A padding query sees only padding at or before it (itself at least), so no
    row of the mask is empty; its output is ignored downstream."""
    real_bt = mask_bt.astype(bool)
    ids_bt = jnp.ones_like(real_bt, jnp.int32) if segment_ids_bt is None else segment_ids_bt
    return jnp.where(real_bt, ids_bt.astype(jnp.int32), 0)


def splash_supported(q_len: int, kv_len: int, *, cached: bool) -> bool:
    """Whether splash attention can run this call (see the module docstring)."""
    return not cached and q_len == kv_len and q_len % SPLASH_BLOCK == 0


_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attention_target_backend", default=None
)


@contextlib.contextmanager
def target_backend(backend: str | None) -> Iterator[None]:
    """Choose kernels for ``backend`` ("tpu", "gpu", "cpu"; None: JAX's default backend) while
    tracing in this context: ``posttrain plan`` traces on a CPU host the step that libtpu
    compiles for a TPU, which should hold the TPU's kernel (splash, not interpreted)."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def current_backend() -> str:
    """The backend kernels are chosen for: ``target_backend``'s, else JAX's default."""
    return _TARGET_BACKEND.get() or jax.default_backend()


def current_mesh() -> AbstractMesh | None:
    """The mesh in scope (``jax.set_mesh``) when it spans more than one device, else None: the
    mesh ``splash_attention`` runs its ``shard_map`` over."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size <= 1 else mesh


def choose_kernel(
    implementation: str,
    *,
    dtype: jnp.dtype,
    q_len: int,
    kv_len: int,
    cached: bool,
    logit_cap: float | None,
    backend: str | None = None,
    devices: int | None = None,
    mesh_in_scope: bool | None = None,
) -> str:
    """ "splash", "cudnn", "xla", "grouped" or "reference" for this call (see the module docstring).
    ``mesh_in_scope`` (default: ``current_mesh()`` is not None): a multi-device mesh is set, so
    splash can run per shard under ``shard_map``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention {implementation!r} unknown; known: {', '.join(IMPLEMENTATIONS)}"
        )
    if implementation == "reference":
        return "reference"
    backend = current_backend() if backend is None else backend
    devices = jax.device_count() if devices is None else devices
    mesh_in_scope = current_mesh() is not None if mesh_in_scope is None else mesh_in_scope
    splash_ok = splash_supported(q_len, kv_len, cached=cached)
    if implementation == "splash" and splash_ok and backend != "gpu":  # no GPU Mosaic kernel
        return "splash"
    if implementation == "auto" and backend == "tpu" and splash_ok:
        if devices == 1 or mesh_in_scope:
            return "splash"
    if logit_cap is not None:  # jax.nn.dot_product_attention has no soft-capping
        return "reference"
    if implementation in ("xla", "cudnn", "grouped"):
        return implementation
    if backend == "cpu":
        return "grouped"
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and sixteen_bit else "xla"


@functools.lru_cache(maxsize=64)
def _splash_kernel(
    heads: int,
    seq: int,
    window: int | None,
    logit_cap: float | None,
    interpret: bool,
    mesh: AbstractMesh,
):
    """One example's kernel: q [H, T, D], k/v [K, T, D], SegmentIds([T], [T]) -> [H, T, D].
    ``mesh``: the abstract mesh in scope (inside ``shard_map``: its manual mesh), which the
    kernel's mask arrays carry, so one kernel per mesh."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    shape = (seq, seq)
    one_head: sm.Mask = sm.CausalMask(shape)
    if window is not None:  # transformers keeps key k for query q when q - window < k <= q
        one_head = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    b = SPLASH_BLOCK
    blocks = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    # Cached across calls, so its mask arrays must be concrete, not tracers of the trace (a
    # shard_map's, a jit's) that first asked for it.
    del mesh
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            sm.MultiHeadMask([one_head] * heads),
            block_sizes=blocks,
            attn_logits_soft_cap=logit_cap,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def splash_specs(
    mesh: Mesh | AbstractMesh, batch: int, heads: int, kv_heads: int
) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """``shard_map`` specs for q [B, T, H, D], k/v [B, S, K, D] and segment ids [B, T]: the
    batch over the data-parallel axes (data, fsdp) that divide it, the heads over tensor when
    both H and K divide by it (else every shard runs all heads: the kernel's grouped-query map
    of query head h to kv head h // (H / K) holds per shard only when both are split alike),
    the sequence whole (the kernel sees every key)."""
    spec = logical_to_spec(("batch", "seq", "heads", "head_dim"), (batch, 1, heads, 1), mesh)
    kv_spec = logical_to_spec(
        ("batch", "seq", "kv_heads", "head_dim"), (batch, 1, kv_heads, 1), mesh
    )
    if spec[2] != kv_spec[2]:
        spec = PartitionSpec(spec[0], None, None, None)
    return spec, PartitionSpec(spec[0], None, spec[2], None), PartitionSpec(spec[0], None)


def splash_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    segment_ids_bt: jax.Array,
    scale: float,
    *,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    interpret: bool | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> jax.Array:
    """Causal (or sliding-window) grouped-query attention with segment ids, [B, T, H, D], as
    ``reference_attention`` computes it on the mask ``attention_masks`` builds (equal on real
    tokens). ``segment_ids_bt`` from ``kernel_segment_ids``. ``interpret`` (default: not on a
    TPU) runs the Pallas kernel in interpret mode, e.g. on the CPU for tests. ``mesh`` (default:
    ``current_mesh()``): with more than one device, the kernel runs per shard under
    ``jax.shard_map`` with ``splash_specs``."""
    B, T, H, D = q_bthd.shape
    if not splash_supported(T, k_bskd.shape[1], cached=False):
        raise ValueError(f"splash attention needs T == S, a multiple of {SPLASH_BLOCK}; got {T}")
    interpret = current_backend() != "tpu" if interpret is None else interpret
    local = functools.partial(
        _splash_local,
        scale=scale,
        sliding_window=sliding_window,
        logit_cap=logit_cap,
        interpret=interpret,
    )
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None or mesh.size <= 1:
        return local(q_bthd, k_bskd, v_bskd, segment_ids_bt)
    q_spec, kv_spec, seg_spec = splash_specs(mesh, B, H, k_bskd.shape[2])
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,  # the Pallas call has no replication rule
    )
    return sharded(q_bthd, k_bskd, v_bskd, segment_ids_bt)


def _splash_local(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    segment_ids_bt: jax.Array,
    *,
    scale: float,
    sliding_window: int | None,
    logit_cap: float | None,
    interpret: bool,
) -> jax.Array:
    """``splash_attention`` on one device's arrays (all of them without a mesh): the kernel for
    its local head count, vmapped over its rows."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    kernel = _splash_kernel(
        q_bthd.shape[2],
        q_bthd.shape[1],
        sliding_window,
        logit_cap,
        interpret,
        jax.sharding.get_abstract_mesh(),
    )
    dtype = q_bthd.dtype
    # The kernel has no scale argument: scaling q scales the logits (before soft-capping, as
    # the reference does).
    q_bhtd = (q_bthd * jnp.asarray(scale, dtype)).transpose(0, 2, 1, 3)
    k_bksd = k_bskd.astype(dtype).transpose(0, 2, 1, 3)
    v_bksd = v_bskd.astype(dtype).transpose(0, 2, 1, 3)
    segments = sk.SegmentIds(q=segment_ids_bt, kv=segment_ids_bt)
    out_bhtd = jax.vmap(kernel)(q_bhtd, k_bksd, v_bksd, segment_ids=segments)
    return out_bhtd.transpose(0, 2, 1, 3)
