"""One forward of a group's shared prompt, not one per completion (Prefix Grouper's idea).

GRPO-family rollout rows come in runs of G: G completions of one prompt, laid out
``[prompt (left-padded to P) | completion (W tokens)]``. Causal attention makes the prompt's
hidden states the same in all G rows, so computing them once per run and letting the G
completions attend to that run's keys/values gives the same outputs, gradients included (the
copies' gradients add up at the shared prompt, as they would over G separate copies), for
(P / G + W) / (P + W) of the decoder layers' token work.

Built on the generation path: the prompts fill a KV cache (``B / G`` rows), the cache is copied
to the G rows of each run, and the completions run through it. So the attention is the cached
path's (``cached_attention``, or XLA's/cuDNN's fused kernel for T > 1 off the CPU), whatever
``training.attention`` says, and the layers run unrolled without remat: callers use it only
where that costs no memory the job counted on (``algorithms/grpo.update_prompt_group``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.trainer.models.attention_kernels import choose_kernel


def shared_prefix_hidden(
    model: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    prefix_len: int,
    group: int,
) -> jax.Array:
    """``model.hidden_states(input_ids, attention_mask)[0]`` ([B, L, E]) for rows whose first
    ``prefix_len`` columns (ids and mask) are equal within each run of ``group`` rows; the
    prompt part is computed for the first row of each run only.

    The caller guarantees the runs (the rollout batch checks them on the host); rows whose
    prefixes differ would silently get their run's first prefix.
    """
    B, L = input_ids.shape
    if group < 1 or B % group:
        raise ValueError(f"{B} rows are not whole runs of group={group}")
    if not 0 < prefix_len < L:
        raise ValueError(f"prefix_len must be in (0, {L}), got {prefix_len}")
    runs = B // group
    # A reshape, not a strided slice: rows sharded over data-parallel devices in whole runs keep
    # their runs on their device.
    first_ids = input_ids.reshape(runs, group, L)[:, 0, :prefix_len]
    first_mask = attention_mask.reshape(runs, group, L)[:, 0, :prefix_len]
    cache = model.init_cache(runs, L)
    prompt_hidden, cache = model.hidden_states(first_ids, first_mask, cache=cache)
    copies = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, group, axis=0), cache)
    completion_hidden, _ = model.hidden_states(
        input_ids[:, prefix_len:], attention_mask[:, prefix_len:], cache=copies
    )
    prompt_hidden = jnp.repeat(prompt_hidden, group, axis=0)
    return jnp.concatenate([prompt_hidden.astype(completion_hidden.dtype), completion_hidden], 1)


def shares_prompt(model: Any, length: int) -> bool:
    """Whether a forward over rows of ``length`` tokens may share prompts: not where the training
    attention would be splash (TPUs), whose kernel never holds the [T, S] scores that the cached
    path's attention does."""
    attention = model.model.layers[0].self_attn
    kernel = choose_kernel(
        attention.implementation,
        dtype=jnp.dtype(model.dtype),
        q_len=length,
        kv_len=length,
        cached=False,
        logit_cap=attention.logit_cap,
    )
    return kernel != "splash"


def rollout_hidden(
    model: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    completion_width: int | None,
    prompt_group: int = 1,
) -> jax.Array:
    """Final hidden states [B, L, E] of rollout rows ``[prompt | completion_width tokens]``:
    with ``prompt_group`` > 1 (runs of that many rows share their prompt) through
    ``shared_prefix_hidden`` where ``shares_prompt`` allows, else the plain forward."""
    L = input_ids.shape[1]
    if prompt_group > 1 and completion_width and completion_width < L:
        if shares_prompt(model, L):
            return shared_prefix_hidden(
                model,
                input_ids,
                attention_mask,
                prefix_len=L - completion_width,
                group=prompt_group,
            )
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    return hidden


def check_prompt_runs(columns: Iterable[np.ndarray], group: int, remedy: str) -> None:
    """On the host, before a shared pass: each run of ``group`` rows must hold equal ``columns``
    (a prompt's ids and mask). A run that does not would be computed from its first row's
    prompt, silently wrong, so it is refused with ``remedy`` (what turns the sharing off)."""
    for x in columns:
        x = np.asarray(x)
        runs = x.reshape(len(x) // group, group, -1)
        if not (runs == runs[:, :1]).all():
            raise ValueError(f"the rows are not runs of {group} copies of one prompt; {remedy}")
