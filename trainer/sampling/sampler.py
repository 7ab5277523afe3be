"""Batched generation with a KV cache: greedy, temperature, top-k, top-p; jitted with bucketed shapes.

Prompts are left-padded (real tokens flush right), so every row's next token is written at the
same cache slot. Prompt length and the number of new tokens are rounded up to buckets (powers of
two), so prompts of different lengths reuse one compiled program; the decode loop is a
``lax.while_loop`` that stops early once every row has produced an EOS.

Data parallel: on a mesh the rows (prompts, KV cache, logits, outputs) shard over the batch axes
(``data``, ``fsdp``) while the weights stay as trained. Rows can be generated in chunks of
``chunk_rows`` (TRL's ``generation_batch_size``), so the KV cache is sized for a chunk. Every
row draws its randomness from the seed folded with its global row index, so the tokens do not
depend on the device count or the chunking.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from posttrain.trainer.models import CausalLM
from posttrain.trainer.models.sharding import LOGICAL_AXIS_RULES
from posttrain.trainer.models.shared_prefix import check_prompt_runs

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``generate`` returns.

    tokens [B, N] int32: the new tokens; ``pad_id`` after a row has finished.
    logprobs [B, N] float32: log-probability of each sampled token under the model's raw logits,
        i.e. ``log_softmax(logits)[token]`` at temperature 1 with no top-k/top-p filtering (what a
        training forward pass computes for the same token); 0 where ``mask`` is False.
    mask [B, N] bool: True for generated tokens up to and including the first EOS.
    lengths [B] int32: number of True entries of ``mask`` per row.
    sampling_logprobs [B, N] float32: log-probability of each token under the distribution it was
        drawn from: ``log_softmax`` of ``logits / temperature`` over the tokens top-k and top-p
        kept (renormalised over them; TRL's and vLLM's processed log-probs), the behaviour policy
        of importance-sampling corrections. Greedy rows: the same as ``logprobs`` (the raw
        distribution at temperature 1; the argmax's own point mass would always give 0).
        0 where ``mask`` is False.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    sampling_logprobs: jax.Array


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties with the k-th kept), others -inf."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def filter_top_p(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches p (at least one)."""
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def first_argmax(logits_bv: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` (first maximum; first NaN if any) as two plain reductions.

    XLA:CPU lowers argmax to one variadic (value, index) reduction, which measured ~7x slower than
    a max followed by a min over the indices that hold it, on [8, 8192] logits.
    """
    top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    is_top = (logits_bv == top_b1) | jnp.isnan(logits_bv)
    vocab = logits_bv.shape[-1]
    return jnp.min(jnp.where(is_top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def token_logprob(logits_bv: jax.Array, token_b: jax.Array) -> jax.Array:
    """``log_softmax(logits)[token]`` without materialising the [B, V] log-softmax."""
    chosen = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
    return chosen - jax.nn.logsumexp(logits_bv, axis=-1)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Gumbel noise of ``shape`` [B, V]: one key for the whole array, or one key per row ([B])."""
    if key.ndim == 0:
        return jax.random.gumbel(key, shape, dtype)
    return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:], dtype))(key)


def sample_token_and_logprobs(
    logits_bv: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    *,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token [B] int32, raw log-prob [B], sampling log-prob [B]) for one step.

    ``key``: one PRNG key, or one per row ([B]: what makes a row's draw independent of the
    batch it is in). The raw log-prob is ``log_softmax(logits)[token]``; the sampling log-prob is
    that of the distribution the token was drawn from (tempered, filtered, renormalised).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    if greedy:
        token = first_argmax(logits_bv).astype(jnp.int32)
        raw = token_logprob(logits_bv, token)
        return token, raw, raw
    scaled = logits_bv / temperature
    if top_k is not None:
        scaled = filter_top_k(scaled, top_k)
    if use_top_p:
        scaled = filter_top_p(scaled, top_p)
    # jax.random.categorical's Gumbel-max draw (same key, same tokens) with the faster argmax.
    noise = gumbel_noise(key, scaled.shape, scaled.dtype)
    token = first_argmax(scaled + noise).astype(jnp.int32)
    # Filtered tokens are -inf in `scaled`, so its logsumexp renormalises over the kept ones.
    return token, token_logprob(logits_bv, token), token_logprob(scaled, token)


def sample_token(
    logits_bv: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    *,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
) -> tuple[jax.Array, jax.Array]:
    """(token [B] int32, log_softmax(logits)[token] [B]) for one step."""
    token, raw, _ = sample_token_and_logprobs(
        logits_bv, key, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p
    )
    return token, raw


def stop_token_ids(*sources: int | Iterable[int] | None) -> tuple[int, ...]:
    """Every EOS id of ``sources`` (an id, several, or None each), first occurrence order.

    E.g. ``stop_token_ids(model.config.eos_token_ids, tokenizer.eos_token_id)``: Llama 3
    instruct's generation config ends turns with 128009 and 128008 as well as 128001, while its
    tokenizer names one id only.
    """
    ids: list[int] = []
    for source in sources:
        if source is None:
            continue
        for i in [source] if isinstance(source, (int, np.integer)) else source:
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


# --------------------------------------------------------------------------- layout


def batch_axes(mesh: Mesh | None) -> tuple[str, ...]:
    """The mesh axes a batch's rows shard over (the ``batch`` rule: data, fsdp) that it has."""
    if mesh is None:
        return ()
    rule = LOGICAL_AXIS_RULES["batch"]
    names = (rule,) if isinstance(rule, str) else tuple(rule or ())
    return tuple(a for a in names if a in mesh.shape)


def data_parallel_size(mesh: Mesh | None) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh)) if mesh is not None else 1


def row_layout(rows: int, dp: int, chunk_rows: int | None) -> tuple[int, int]:
    """(rows after padding, rows per chunk). A chunk is a multiple of the data-parallel size dp;
    the batch is padded with throwaway rows up to a whole number of chunks."""
    if chunk_rows is not None:
        if chunk_rows < 1 or chunk_rows % dp:
            raise ValueError(
                f"chunk_rows ({chunk_rows}) must be a positive multiple of the data-parallel size "
                f"({dp}: the mesh's data x fsdp)"
            )
        chunk = min(chunk_rows, -(-rows // dp) * dp)
    else:
        chunk = -(-rows // dp) * dp
    return -(-rows // chunk) * chunk, chunk


def _mesh_of(model: Any) -> Mesh | None:
    """The mesh the model's weights are sharded on (None when they sit on one device)."""
    for leaf in jax.tree.leaves(model):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if isinstance(sharding, NamedSharding) and isinstance(mesh, Mesh) and mesh.size > 1:
            return mesh
    return None


def _rows_sharding(mesh: Mesh, ndim: int, dim: int = 0) -> NamedSharding:
    spec: list[Any] = [PartitionSpec.UNCONSTRAINED] * ndim
    spec[dim] = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _constrain_rows(tree: Any, mesh: Mesh | None, dim: int = 0) -> Any:
    """Pin dimension ``dim`` of every array in ``tree`` (rank > dim) to the batch axes: XLA then
    keeps each device's rows (and their KV cache) local; other dims stay for XLA to choose."""
    if mesh is None or data_parallel_size(mesh) == 1:
        return tree

    def pin(x: jax.Array) -> jax.Array:
        if x.ndim <= dim:
            return x
        return jax.lax.with_sharding_constraint(x, _rows_sharding(mesh, x.ndim, dim))

    return jax.tree.map(pin, tree)


def _to_chunks(x: jax.Array, n_chunks: int, dp: int, mesh: Mesh | None) -> jax.Array:
    """[R, ...] -> [C, R / C, ...] where chunk c takes the c-th slice of every device's rows, so
    no row changes device (row r = k R/dp + c m + j goes to chunk c, place k m + j)."""
    rows, rest = x.shape[0], x.shape[1:]
    m = rows // (dp * n_chunks)
    y = x.reshape(dp, n_chunks, m, *rest).swapaxes(0, 1).reshape(n_chunks, dp * m, *rest)
    return _constrain_rows(y, mesh, dim=1)


def _from_chunks(y: jax.Array, dp: int) -> jax.Array:
    """Inverse of ``_to_chunks``."""
    n_chunks, chunk, rest = y.shape[0], y.shape[1], y.shape[2:]
    m = chunk // dp
    return y.reshape(n_chunks, dp, m, *rest).swapaxes(0, 1).reshape(n_chunks * chunk, *rest)


def _left_pad(prompt_ids: Any, prompt_mask: Any, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as [B, P] ids and mask; ragged lists are left-padded here."""
    if (
        isinstance(prompt_ids, (list, tuple))
        and prompt_ids
        and isinstance(prompt_ids[0], (list, tuple))
    ):
        if prompt_mask is not None:
            raise ValueError(
                "prompt_mask is only for a [batch, len] array; a list of lists needs none"
            )
        width = max(len(p) for p in prompt_ids)
        ids = np.full((len(prompt_ids), width), pad_id, np.int32)
        mask = np.zeros((len(prompt_ids), width), np.int32)
        for row, p in enumerate(prompt_ids):
            if len(p):
                ids[row, width - len(p) :] = p
                mask[row, width - len(p) :] = 1
        return ids, mask
    ids = np.asarray(prompt_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [batch, len], got shape {ids.shape}")
    mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(
            f"prompt_mask shape {mask.shape} differs from prompt_ids shape {ids.shape}"
        )
    return ids, mask


def prefill_group(prompt_group: int, batch: int, rows: int, chunk: int, dp: int) -> int:
    """How many rows share one prefill: ``prompt_group`` when the layout allows it (no chunking,
    no padding rows, the batch made of whole runs that split evenly over ``dp`` devices), else 1."""
    if prompt_group < 1:
        raise ValueError(f"prompt_group must be >= 1, got {prompt_group}")
    if batch % prompt_group or chunk != rows or rows != batch or (rows // prompt_group) % dp:
        return 1
    return prompt_group


def _put_rows(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host array onto the mesh with its rows sharded (each process supplies its own rows of the
    same full array, so this also works across hosts)."""
    if mesh is None:
        return jnp.asarray(x)
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _options(
    temperature: float, top_k: int | None, top_p: float | None, vocab: int
) -> dict[str, Any]:
    """The sampler's static switches."""
    return dict(
        greedy=temperature == 0.0,
        top_k=None if top_k is None or top_k >= vocab else int(top_k),
        use_top_p=top_p is not None and top_p < 1.0,
    )


def generate(
    model: CausalLM,
    prompt_ids: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | jax.Array = 0,
    prompt_mask: Any = None,
    *,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    chunk_rows: int | None = None,
    prompt_group: int = 1,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens for a batch of prompts.

    prompt_ids: [B, P] left-padded ids with ``prompt_mask`` (1 = real; default all real), or a
    list of token lists of different lengths. temperature 0 is greedy (argmax); otherwise sample
    from softmax(logits / temperature) after top-k then top-p filtering. A row stops after its
    first token in ``eos_id`` (an id or several: pass every EOS id of the model's generation
    config, see ``stop_token_ids``). ``seed``: an int or a JAX PRNG key; row r draws from the
    seed folded with r, so a row's tokens do not depend on the mesh or the chunking.

    mesh: the rows shard over its batch axes (data, fsdp), the weights stay as they are; default:
    the mesh the model's weights are sharded on, if any. chunk_rows: generate this many rows at
    a time (a multiple of the mesh's data x fsdp), so the KV cache holds one chunk; default: all.
    The returned arrays are sharded like the rows (``np.asarray`` gathers them).
    prompt_group: the rows come in runs of this many copies of one prompt (GRPO's G samples of a
    prompt): each run's prompt is prefilled once and its KV cache copied to the run's rows, which
    then draw their own tokens. Used when the rows are not chunked and the runs split evenly over
    the mesh's data-parallel devices; otherwise every row is prefilled.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    ids, mask = _left_pad(prompt_ids, prompt_mask, pad_id)
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of prompt_mask has padding")
    mesh = _mesh_of(model) if mesh is None else mesh
    if mesh is not None and data_parallel_size(mesh) == 1 and mesh.size == 1:
        mesh = None
    batch, length = ids.shape
    rows, chunk = row_layout(batch, data_parallel_size(mesh), chunk_rows)
    group = prefill_group(prompt_group, batch, rows, chunk, data_parallel_size(mesh))
    if group > 1:
        check_prompt_runs((ids, mask), group, "prompt_group=1 samples every row's own prompt")
    prompt_len = bucket(length, MIN_PROMPT_BUCKET)
    new_len = bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    # Padding rows copy the last prompt (a valid, left-padded one); their draws use row indices
    # past the batch, so they cannot change a real row's tokens. They are dropped below.
    ids = np.pad(ids, ((0, rows - batch), (prompt_len - length, 0)), mode="edge")
    ids[:, : prompt_len - length] = pad_id
    mask = np.pad(mask, ((0, rows - batch), (prompt_len - length, 0)), mode="edge")
    mask[:, : prompt_len - length] = 0
    eos = np.asarray([-1] if eos_id is None else np.atleast_1d(eos_id), np.int32)
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 jax.random.PRNGKey
        key = jax.random.wrap_key_data(key)
    out = _generate_jit(
        model,  # an NNX module is a pytree: flattening it is ~10x cheaper than nnx.split per call
        _put_rows(ids, mesh),
        _put_rows(mask, mesh),
        jnp.asarray(max_new_tokens, jnp.int32),
        key,
        jnp.asarray(max(temperature, 1e-6), jnp.float32),
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        jnp.asarray(eos),
        jnp.asarray(pad_id, jnp.int32),
        new_len=new_len,
        mesh=mesh,
        chunk_rows=None if chunk == rows else chunk,
        prompt_group=group,
        **_options(temperature, top_k, top_p, model.config.vocab_size),
    )
    n = max_new_tokens
    if rows == batch:
        return Generation(
            out.tokens[:, :n],
            out.logprobs[:, :n],
            out.mask[:, :n],
            out.lengths,
            out.sampling_logprobs[:, :n],
        )
    return Generation(
        out.tokens[:batch, :n],
        out.logprobs[:batch, :n],
        out.mask[:batch, :n],
        out.lengths[:batch],
        out.sampling_logprobs[:batch, :n],
    )


def lower_generate(
    graphdef: Any,
    state: Any,
    state_shardings: Any,
    mesh: Mesh,
    rows: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    chunk_rows: int | None = None,
    *,
    eos_count: int = 1,
    prompt_group: int = 1,
) -> jax.stages.Lowered:
    """The rollout program ``generate`` runs, lowered ahead of time (for ``posttrain plan``).

    graphdef, state: ``nnx.split(model)`` of the policy (``state`` may be abstract:
    ``jax.ShapeDtypeStruct`` leaves); state_shardings: the weights' shardings as trained. rows
    prompts of ``prompt_len`` tokens and ``max_new_tokens`` new ones (both rounded up to the
    sampler's buckets, as ``generate`` does), their rows sharded over the mesh's batch axes,
    ``chunk_rows`` at a time, runs of ``prompt_group`` rows prefilled once (as ``generate``).
    ``.compile().memory_analysis()`` gives the per-device memory.
    """
    from flax import nnx

    vocab = nnx.merge(graphdef, state).config.vocab_size
    dp = data_parallel_size(mesh)
    padded, chunk = row_layout(rows, dp, chunk_rows)
    prompt_bucket = bucket(prompt_len, MIN_PROMPT_BUCKET)
    options = dict(
        new_len=bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET),
        mesh=mesh,
        chunk_rows=None if chunk == padded else chunk,
        prompt_group=prefill_group(prompt_group, rows, padded, chunk, dp),
        **_options(temperature, top_k, top_p, vocab),
    )

    def run(state: Any, *inputs: Any) -> Generation:
        return _generate_jit(nnx.merge(graphdef, state), *inputs, **options)

    rep = NamedSharding(mesh, PartitionSpec())
    row_sharding = NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))
    scalar = functools.partial(jax.ShapeDtypeStruct, ())
    args = (
        state,
        jax.ShapeDtypeStruct((padded, prompt_bucket), jnp.int32),  # ids
        jax.ShapeDtypeStruct((padded, prompt_bucket), jnp.int32),  # mask
        scalar(jnp.int32),  # max_new
        jax.eval_shape(lambda: jax.random.key(0)),  # key
        scalar(jnp.float32),  # temperature
        scalar(jnp.float32),  # top_p
        jax.ShapeDtypeStruct((eos_count,), jnp.int32),  # eos
        scalar(jnp.int32),  # pad_id
    )
    in_shardings = (state_shardings, row_sharding, row_sharding, *([rep] * (len(args) - 3)))
    return jax.jit(run, in_shardings=in_shardings).lower(*args)


@functools.partial(
    jax.jit,
    static_argnames=(
        "new_len",
        "greedy",
        "top_k",
        "use_top_p",
        "mesh",
        "chunk_rows",
        "prompt_group",
    ),
)
def _generate_jit(
    model,
    ids,
    mask,
    max_new,
    key,
    temperature,
    top_p,
    eos,
    pad_id,
    *,
    new_len,
    greedy,
    top_k,
    use_top_p,
    mesh=None,
    chunk_rows=None,
    prompt_group=1,
):
    rows = ids.shape[0]
    chunk = rows if chunk_rows is None else chunk_rows
    if rows % chunk:
        raise ValueError(f"{rows} rows are not a whole number of chunks of {chunk}")
    dp = data_parallel_size(mesh)
    ids, mask = _constrain_rows((ids, mask), mesh)
    row_index = _constrain_rows(jnp.arange(rows, dtype=jnp.int32), mesh)
    run = functools.partial(
        _generate_chunk,
        model,
        max_new=max_new,
        key=key,
        temperature=temperature,
        top_p=top_p,
        eos=eos,
        pad_id=pad_id,
        new_len=new_len,
        greedy=greedy,
        top_k=top_k,
        use_top_p=use_top_p,
        mesh=mesh,
    )
    if chunk == rows:
        return run(ids, mask, row_index, prompt_group=prompt_group)
    # One chunk after the other (lax.map is a scan): the KV cache and logits exist for one chunk.
    n_chunks = rows // chunk
    chunks = [_to_chunks(x, n_chunks, dp, mesh) for x in (ids, mask, row_index)]
    out = jax.lax.map(lambda xs: run(*xs), tuple(chunks))
    return _constrain_rows(jax.tree.map(lambda y: _from_chunks(y, dp), out), mesh)


def _generate_chunk(
    model,
    ids,
    mask,
    row_index,
    *,
    max_new,
    key,
    temperature,
    top_p,
    eos,
    pad_id,
    new_len,
    greedy,
    top_k,
    use_top_p,
    mesh,
    prompt_group=1,
):
    """Prefill and decode loop for one chunk of rows; ``row_index`` [B]: their global indices.
    ``prompt_group`` > 1: runs of that many rows share a prompt, prefilled once per run."""
    batch, prompt_len = ids.shape
    pin = functools.partial(_constrain_rows, mesh=mesh)
    # Row r's draws come from key(seed, r), whatever chunk or device the row is on.
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_index)
    sample = functools.partial(
        sample_token_and_logprobs,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        top_k=top_k,
        use_top_p=use_top_p,
    )

    def step_keys(i):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, i)

    def record(i, token, logp, sample_logp, tokens, logps, sample_logps, valid, done):
        """Token i into the outputs; rows already done get pad_id and no mask."""
        live = ~done
        token = jnp.where(live, token, pad_id)
        tokens = tokens.at[:, i].set(token)
        logps = logps.at[:, i].set(jnp.where(live, logp, 0.0))
        sample_logps = sample_logps.at[:, i].set(jnp.where(live, sample_logp, 0.0))
        valid = valid.at[:, i].set(live)
        return token, tokens, logps, sample_logps, valid, done | jnp.isin(token, eos)

    # Always through __call__, so qwix's LoRA/quantization interception applies.
    g = prompt_group
    cache = pin(model.init_cache(batch // g, prompt_len + new_len))
    logits, cache = model(ids[::g], mask[::g], cache=cache, last_only=True)
    if g > 1:  # every row of a run continues from its prompt's cache and last logits
        cache = jax.tree.map(lambda x: jnp.repeat(x, g, axis=0) if x.ndim else x, cache)
        logits = jnp.repeat(logits, g, axis=0)
    cache = pin(cache)
    token, logp, sample_logp = sample(pin(logits[:, 0]), step_keys(0))
    outputs = pin(
        (
            jnp.full((batch, new_len), pad_id, jnp.int32),
            jnp.zeros((batch, new_len), jnp.float32),
            jnp.zeros((batch, new_len), jnp.float32),
            jnp.zeros((batch, new_len), bool),
            jnp.zeros((batch,), bool),
        )
    )
    token, *outputs = record(0, token, logp, sample_logp, *outputs)

    # Token i needs the forward of token i - 1 only: max_new - 1 decode steps, none wasted after
    # the last token.
    def cond(carry):
        i, _, _, *_, done = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, cache, token, *outputs = carry
        logits, cache = model(token[:, None], cache=cache)
        token, logp, sample_logp = sample(pin(logits[:, 0]), step_keys(i))
        token, *outputs = record(i, token, logp, sample_logp, *outputs)
        return (i + 1, pin(cache), token, *outputs)

    carry = (jnp.ones((), jnp.int32), cache, token, *outputs)
    _, _, _, tokens, logps, sample_logps, valid, _ = jax.lax.while_loop(cond, body, carry)
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    return Generation(tokens, logps, valid, lengths, sample_logps)
