"""The learning-rate schedule (a pure function of the step) and the optimizer, from spec.training.

Parameter groups: an algorithm may give its heads their own peak learning rate (PPO's critic);
those leaves get the same optimizer and schedule shape with that peak (``optax.multi_transform``,
labels from the leaf's path ``heads/<name>/...``). Clipping stays global over all groups.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
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
    training: TrainingSpec, learning_rates: Mapping[str, float] | None = None
) -> optax.GradientTransformation:
    """Clip (maxGradNorm) then AdamW / Adafactor / SGD with the schedule; heads named in
    ``learning_rates`` get their own peak rate (same schedule shape)."""
    tx = _update_rule(training, schedule(training))
    if learning_rates:
        groups = {POLICY: tx}
        for head, peak in learning_rates.items():
            groups[head_label(head)] = _update_rule(training, schedule(training, peak))
        tx = optax.multi_transform(groups, lambda params: param_labels(params, learning_rates))
    if training.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(training.max_grad_norm), tx)
    return tx


def head_label(head: str) -> str:
    return f"heads/{head}"


def param_labels(params: Any, learning_rates: Mapping[str, float]) -> Any:
    """Each leaf's group: ``heads/<name>`` for a head with its own rate, else ``policy``. A rate
    for a head the trainee does not have is refused (the optimizer's init calls this)."""
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
        return POLICY

    return jax.tree_util.tree_map_with_path(label, params)


def _update_rule(training: TrainingSpec, lr: optax.Schedule) -> optax.GradientTransformation:
    o = training.optimizer
    if o.name == "adamw":
        return optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        return optax.adafactor(lr, weight_decay_rate=o.weight_decay or None)
    return optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(lr))
