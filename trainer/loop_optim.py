"""The learning-rate schedule (a pure function of the step) and the optimizer, from spec.training."""

from __future__ import annotations

import optax

from posttrain.api.v1alpha1 import TrainingSpec


def warmup_steps(training: TrainingSpec) -> int:
    s = training.schedule
    if s.warmup_steps is not None:
        return min(s.warmup_steps, training.steps)
    return int(round(s.warmup_ratio * training.steps))


def schedule(training: TrainingSpec) -> optax.Schedule:
    """Linear warm-up from 0 to learningRate, then cosine/linear decay to minRatio, or constant.

    ``schedule(training)(k)`` is the rate used by the k-th update (k = 0 first), so warm-up never
    spends a step at rate 0 except when warmupSteps > 0 makes step 0 its start.
    """
    peak = training.learning_rate
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


def optimizer(training: TrainingSpec) -> optax.GradientTransformation:
    """Clip (maxGradNorm) then AdamW / Adafactor / SGD with the schedule."""
    o = training.optimizer
    lr = schedule(training)
    if o.name == "adamw":
        tx = optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
    elif o.name == "adafactor":
        tx = optax.adafactor(lr, weight_decay_rate=o.weight_decay or None)
    else:
        tx = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(lr))
    if training.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(training.max_grad_norm), tx)
    return tx
