"""The learning-rate schedule (a pure function of the step) and the optimizer, from spec.training.

Parameter groups: an algorithm may give its heads their own peak learning rate (PPO's critic);
those leaves get the same optimizer and schedule shape with that peak (``optax.multi_transform``,
labels from the leaf's path ``heads/<name>/...``). Clipping stays global over all groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from posttrain.api.v1alpha1 import TrainingSpec

POLICY = "policy"  # the label of every leaf without a group of its own


def warmup_steps(training: TrainingSpec) -> int:
    s = training.schedule
    if s.warmup_steps is not None:
        return min(s.warmup_steps, training.steps)
    return int(round(s.warmup_ratio * training.steps))


def schedule(training: TrainingSpec, peak: float | None = None) -> optax.Schedule:
    """Linear warm-up from 0 to learningRate, then cosine/linear decay to minRatio, or constant.

    ``schedule(training)(k)`` is the rate used by the k-th update (k = 0 first), so warm-up never
    spends a step at rate 0 except when warmupSteps > 0 makes step 0 its start.
    """
    peak = training.learning_rate if peak is None else peak
    s = training.schedule
    warm = warmup_steps(training)
    decay = max(training.steps - warm, 1)
    end = peak * s.min_ratio
    if s.name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=s.min_ratio)
    elif s.name == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def optimizer(
    training: TrainingSpec,
    learning_rates: Mapping[str, float] | None = None,
    *,
    policy_idle: tuple[int, int] | None = None,
) -> optax.GradientTransformation:
    """Clip (maxGradNorm) then AdamW / Adafactor / SGD with the schedule; heads named in
    ``learning_rates`` get their own peak rate (same schedule shape). ``policy_idle`` (start,
    end): the policy's parameters are not updated at the optimizer's updates start..end-1
    (0-based; PPO's critic warm-up), while the heads are (``idle_between``)."""
    tx = _update_rule(training, schedule(training))
    if learning_rates or policy_idle:
        rates = dict(learning_rates or {})
        groups = {POLICY: tx if policy_idle is None else idle_between(tx, *policy_idle)}
        for head, peak in rates.items():
            groups[head_label(head)] = _update_rule(training, schedule(training, peak))
        if policy_idle is not None:
            groups[HEADS] = _update_rule(training, schedule(training))
        tx = optax.multi_transform(
            groups,
            lambda params: param_labels(params, rates, heads_apart=policy_idle is not None),
        )
    if training.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(training.max_grad_norm), tx)
    return tx


HEADS = "heads"  # with ``policy_idle``: the heads without a rate of their own


class IdleState(NamedTuple):
    seen: jax.Array  # updates seen, skipped ones included
    inner: Any


def idle_between(
    inner: optax.GradientTransformation, start: int, end: int
) -> optax.GradientTransformation:
    """``inner``, except that its updates ``start``..``end - 1`` (0-based, counted here) are
    skipped: zero updates and ``inner``'s state left as it was, so AdamW neither decays the
    weights, moves them by its moments, nor advances its step count (bias correction and
    schedule resume where they were: verl does not step the actor's optimizer or scheduler
    during critic warm-up)."""

    def init(params: Any) -> IdleState:
        return IdleState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates: Any, state: IdleState, params: Any = None) -> tuple[Any, IdleState]:
        new_updates, new_inner = inner.update(updates, state.inner, params)
        idle = (state.seen >= start) & (state.seen < end)
        out = jax.tree.map(lambda u: jnp.where(idle, jnp.zeros_like(u), u), new_updates)
        kept = jax.tree.map(lambda n, o: jnp.where(idle, o, n), new_inner, state.inner)
        return out, IdleState(state.seen + 1, kept)

    return optax.GradientTransformation(init, update)


def head_label(head: str) -> str:
    return f"heads/{head}"


def param_labels(
    params: Any, learning_rates: Mapping[str, float], *, heads_apart: bool = False
) -> Any:
    """Each leaf's group: ``heads/<name>`` for a head with its own rate, else ``policy`` (with
    ``heads_apart``, other heads ``heads``). A rate for a head the trainee does not have is
    refused (the optimizer's init calls this)."""
    heads = params["heads"] if isinstance(params, Mapping) and "heads" in params else {}
    unknown = set(learning_rates) - set(heads)
    if unknown:
        raise ValueError(
            f"learning_rates for unknown heads {sorted(unknown)}; the heads: {sorted(heads)}"
        )

    def label(path: tuple[Any, ...], _leaf: Any) -> str:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if len(names) >= 2 and names[0] == "heads" and names[1] in learning_rates:
            return head_label(names[1])
        if heads_apart and names and names[0] == "heads":
            return HEADS
        return POLICY

    return jax.tree_util.tree_map_with_path(label, params)


def _update_rule(training: TrainingSpec, lr: optax.Schedule) -> optax.GradientTransformation:
    o = training.optimizer
    if o.name == "adamw":
        return optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        return optax.adafactor(lr, weight_decay_rate=o.weight_decay or None)
    return optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(lr))
