"""PPO with a learned critic: rollouts, KL-shaped rewards, GAE, epochs of mini-batches.

The critic (``ppo.critic``) is a value head on the policy's trunk (``ValueHead``, one shared
forward) or a copy of the base with that head (``SeparateCritic``); either is the algorithm's head
``value``, so it trains in every mode (full, LoRA, QLoRA) and is checkpointed with the policy.

Batch sizes (TRL's PPOTrainer layout): an optimizer step trains on one *mini-batch* of
`training.batchSize` completions (split into micro-batches by `microBatchSize` as usual). A
*rollout batch* is `training.batchSize x numMiniBatches` prompts with one completion each. Each
rollout batch gives numIterations x numMiniBatches optimizer steps: numIterations epochs, each a
fresh seeded permutation of the rollout batch cut into numMiniBatches mini-batches. So the step's
batch shape is fixed, and everything a step sees is a pure function of (training.seed, step).

Per rollout batch (``PpoSource._rollouts``):

1. sample with the shared ``RolloutEngine`` (spec.ppo's sampling settings, a seed derived from
   (training.seed, rollout index)) and score with the job's rewards;
2. one forward on the current weights outside the gradient (``ctx.forward``): old log-probs at the
   sampling temperature and old values from the value head; reference log-probs
   (``ctx.reference_logprobs``, same temperature) when klCoef > 0;
3. token rewards (sequence reward at the last completion token, -klCoef * KL on every token),
   GAE with gamma and lambda, returns = advantages + old values, then advantages whitened over the
   rollout batch's completion tokens (``ppo_loss``).

The loss (``make_loss``) runs one policy forward to its hidden states, which feed the chunked
LM head (log-probs and entropy, ``models/entropy.py``: no [B, T, V] logits) and the value head (a
second forward with a separate critic), and applies ``ppo_loss.ppo_loss``. The first `sftWarmupSteps` steps
are teacher-forced SFT on the data's completions instead (the ``sft`` column), as GRPO's warm-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain.api.settings.ppo import PpoSpec
from posttrain.trainer import rewards as rw
from posttrain.trainer.algorithms import grpo_loss as gl
from posttrain.trainer.algorithms import ppo_loss as pl
from posttrain.trainer.algorithms import rollout_correction as rc
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Column,
    Context,
    Declaration,
    HeadBuilder,
    LossFn,
    Metrics,
    ModelConfigs,
    Models,
    RolloutShape,
)
from posttrain.trainer.algorithms.grpo import correct
from posttrain.trainer.algorithms.report import rl_finish
from posttrain.trainer.algorithms.rollout import (
    METRIC,
    RolloutBatchSource,
    RolloutEngine,
    SamplingSettings,
    group_seed,
    mini_batch_order,  # noqa: F401  (re-exported: it was defined here)
)
from posttrain.trainer.data.prompts import load_prompts
from posttrain.trainer.models.entropy import chunked_logprobs_and_entropy

if TYPE_CHECKING:
    from posttrain.trainer.models import CausalLM

VALUE = "value"  # the head's name: its parameters live under heads/value/...
MISMATCH_METRICS = [  # rollout_correction.mismatch_metrics' names
    "mismatch_kl",
    "mismatch_k3_kl",
    "rollout_probs_diff_mean",
    "rollout_probs_diff_max",
    "rollout_probs_diff_std",
    "rollout_is_mean",
    "rollout_is_ratio_fraction_high",
    "rollout_is_eff_sample_size",
]


class ValueHead(nnx.Module):
    """V(s_t) from the trunk's final hidden state: one float32 linear layer, zero-initialised so
    the critic starts at V = 0 and its first gradients do not reach the trunk."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(
            hidden_size,
            1,
            kernel_init=nnx.initializers.zeros_init(),
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, hidden_bte: jax.Array) -> jax.Array:
        return self.linear(hidden_bte.astype(jnp.float32))[..., 0]


class SeparateCritic(nnx.Module):
    """V(s_t) from a model of its own (``ppo.critic: separate``, as TRL's and verl's critic): a
    copy of the base without adapters, with a ``ValueHead`` on its final hidden states."""

    def __init__(self, trunk: CausalLM, hidden_size: int, *, rngs: nnx.Rngs):
        self.trunk = trunk
        self.value = ValueHead(hidden_size, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        hidden_bte, _ = self.trunk.hidden_states(input_ids, attention_mask)  # no logits needed
        return self.value(hidden_bte)


def scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` in the forward pass; its gradient times ``scale`` in the backward pass."""
    return scale * x + (1.0 - scale) * jax.lax.stop_gradient(x)


def policy_and_values(
    models: Models,
    batch: Mapping[str, jax.Array],
    temperature: float,
    *,
    with_plain: bool = False,
    completion_width: int | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
    """((log-probs of the targets at `temperature`, and with `with_plain` at temperature 1),
    entropy at `temperature`, values [B, T]): one policy forward whose LM head runs chunk by chunk
    (no [B, T, V] logits), with the value head on its hidden states or the separate critic's.
    With ``completion_width`` the LM head runs only where completion tokens are predicted."""
    critic = models.heads[VALUE]
    hidden_bte, _ = models.policy.hidden_states(batch["input_ids"], batch["attention_mask"])
    if isinstance(critic, SeparateCritic):
        values_bt = critic(batch["input_ids"], batch["attention_mask"])
    elif "policy_on" in batch:  # critic warm-up: the value loss does not move the shared trunk
        values_bt = critic(scale_gradient(hidden_bte, batch["policy_on"].mean()))
    else:
        values_bt = critic(hidden_bte)
    logps, entropy_bt = chunked_logprobs_and_entropy(
        hidden_bte,
        models.policy.logits,
        batch["targets"],
        temperatures=(temperature, 1.0) if with_plain else (temperature,),
        entropy_temperature=temperature,
        completion_width=completion_width,
    )
    return logps, entropy_bt, values_bt


# --------------------------------------------------------------------------- the batch source


class PpoSource(RolloutBatchSource):
    """A rollout batch per numIterations x numMiniBatches steps, handed out in mini-batches."""

    def __init__(self, ctx: Context, engine: RolloutEngine):
        p = ctx.spec.settings
        assert isinstance(p, PpoSpec)
        super().__init__(
            ctx,
            engine,
            warmup=p.sft_warmup_steps,
            steps_per_rollout=p.num_iterations * p.num_mini_batches,
        )
        self.p = p
        self.seed = ctx.spec.training.seed
        self.rows = ctx.spec.training.batch_size  # one mini-batch: what a step trains on
        self.rollout_rows = self.rows * p.num_mini_batches
        self._old: Any = None  # the jitted no-grad forward, made on first use
        self.kl_ctrl = (  # verl's adaptive KL controller, checkpointed with the source
            pl.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon)
            if p.target_kl is not None
            else None
        )

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        batch = super().next_batch(step)
        if self.p.critic_warmup_steps:  # 0 on the first criticWarmupSteps steps of RL
            on = step < self.warmup or bool(
                pl.policy_loss_on(step - self.warmup, self.p.critic_warmup_steps)
            )
            batch["policy_on"] = np.full(len(batch["input_ids"]), float(on), np.float32)
        return batch

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.kl_ctrl is not None:
            state = {**state, "kl_ctrl": self.kl_ctrl.state()}
        return state

    def restore_extra(self, state: Mapping[str, Any]) -> None:
        super().restore_extra(state)
        if self.kl_ctrl is not None and "kl_ctrl" in state:
            self.kl_ctrl = pl.AdaptiveKLController.from_state(state["kl_ctrl"])

    def step_batch(self, batch: dict[str, np.ndarray], index: int, k: int) -> dict[str, np.ndarray]:
        epoch, mini = divmod(k, self.p.num_mini_batches)
        order = mini_batch_order(self.rollout_rows, self.seed, index, epoch)
        rows = order[mini * self.rows : (mini + 1) * self.rows]
        return self._per_token_share({key: value[rows] for key, value in batch.items()})

    def evaluate(self, model: Any) -> float:
        return self.engine.evaluate(model, self.rollout_rows)

    def _per_token_share(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # token-mean's denominator per row, so micro-batches average to the mini-batch's mean.
        R = len(batch["completion_mask"])
        batch["tokens_per_row"] = np.full(R, batch["completion_mask"].sum() / R, np.float32)
        return batch

    def _columns(self, batch: dict[str, np.ndarray], *, sft: bool) -> dict[str, np.ndarray]:
        """The columns every batch has (fixed keys, so the step compiles once)."""
        R = len(batch["input_ids"])
        batch.pop("sampler_logp", None)  # read by make_rollout, not by the loss
        if self.warmup:
            batch["sft"] = np.full(R, float(sft), np.float32)
        if sft:  # rollout columns do not exist yet: zeros, and metrics logged as null
            zeros = np.zeros_like(batch["completion_mask"])
            for key in ("old_logp", "old_values", "advantages", "returns"):
                batch[key] = zeros
            if self.p.use_kl_loss:
                batch["ref_logp"] = zeros
            for name in self._metric_names():
                batch[METRIC + name] = np.full(R, np.nan, np.float32)
        return batch

    def _metric_names(self) -> list[str]:
        names = [*self.engine.metric_names(), "kl", "explained_variance", "value_mean"]
        names += MISMATCH_METRICS
        if self.p.rollout_correction.rejection != "none":
            names.append("rollout_rejected_fraction")
        return names + (["kl_coef"] if self.kl_ctrl is not None else [])

    def warmup_batch(self, step: int) -> dict[str, np.ndarray]:
        """Teacher-forced rows: prompt + the data's completion (+ EOS), cut to maxNewTokens."""
        batch = self.engine.teacher_forced(step * self.rows, self.rows)
        return self._per_token_share(self._columns(batch, sft=True))

    def rollout_request(self, index: int) -> tuple[list[Any], int]:
        R = self.rollout_rows
        return [self.engine.prompt(index * R + j) for j in range(R)], group_seed(self.seed, index)

    def make_rollout(self, index: int) -> dict[str, np.ndarray]:
        p, e, R = self.p, self.engine, self.rollout_rows
        out = self.sample(index, *self.rollout_request(index))
        sampler_logp = out.arrays["sampler_logp"]
        batch = self._columns(dict(out.arrays), sft=False)
        if self._old is None:
            self._old = self.ctx.forward(_old_logp_and_values(p.temperature, p.max_new_tokens))
        old_logp, old_values = self._old(batch)
        # The sampler against the learner (always logged); rollout correction when it is on.
        c = p.rollout_correction
        mismatch = rc.mismatch_metrics(
            jnp.asarray(old_logp), jnp.asarray(sampler_logp), jnp.asarray(batch["completion_mask"])
        )
        check = dict(batch, old_logp=np.asarray(old_logp, np.float32), sampler_logp=sampler_logp)
        if c.enabled:
            correct(check, c)
            batch["completion_mask"] = check["completion_mask"]
        mask = jnp.asarray(batch["completion_mask"])
        values = jnp.asarray(old_values, jnp.float32) * mask
        kl = jnp.zeros_like(mask)
        if p.needs_reference:
            ref_logp = self.ctx.reference_logprobs(batch, p.temperature, p.max_new_tokens)
            kl = jnp.asarray(old_logp - ref_logp) * mask
            if p.use_kl_loss:
                batch["ref_logp"] = np.asarray(ref_logp, np.float32)
        scores = pl.missing_eos_penalty(
            jnp.asarray(out.rewards, jnp.float32),
            jnp.asarray(batch["targets"]),
            mask,
            e.eos_id,
            p.missing_eos_penalty,
        )
        kl_coef = p.kl_coef if self.kl_ctrl is None else self.kl_ctrl.value
        rewards = pl.token_rewards(scores, kl, mask, kl_coef if p.kl_coef > 0 else 0.0)
        if p.whiten_rewards:
            rewards = pl.whiten_rewards(rewards, mask)
        adv, returns = pl.gae(rewards, values, mask, p.gamma, p.lambda_)
        if self.kl_ctrl is not None:  # verl: the batch's mean per-token KL, n = its sequences
            per_row = (kl * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
            batch[METRIC + "kl_coef"] = np.full(R, kl_coef, np.float32)
            self.kl_ctrl = self.kl_ctrl.update(float(per_row.mean()), R)
        batch["old_logp"] = np.asarray(old_logp, np.float32)
        batch["old_values"] = np.asarray(values)
        batch["advantages"] = np.asarray(pl.whiten(adv, mask), np.float32)
        if "is_weights" in check:  # TIS: w >= 0 scales -min(r A, clip(r) A) exactly as w A does
            batch["advantages"] = batch["advantages"] * check["is_weights"]
        batch["returns"] = np.asarray(returns, np.float32)

        constant = lambda v: np.full(R, float(v), np.float32)  # noqa: E731
        batch[METRIC + "reward_mean"] = out.rewards.astype(np.float32)
        batch[METRIC + "reward_std"] = constant(out.rewards.std())
        for name, each in out.reward_terms.items():
            batch[f"{METRIC}reward/{name}"] = each.astype(np.float32)
        batch[METRIC + "completion_length"] = out.lengths.astype(np.float32)
        self.host_metrics["generation_tokens_per_second"] = float(
            out.lengths.sum() / max(out.seconds, 1e-9)
        )
        batch[METRIC + "kl"] = constant(pl.masked_mean(kl, mask))
        batch[METRIC + "explained_variance"] = constant(
            pl.explained_variance(values, returns, mask)
        )
        batch[METRIC + "value_mean"] = constant(pl.masked_mean(values, mask))
        for name, value in mismatch.items():
            batch[METRIC + name] = constant(value)
        if "rollout_rejected" in check:
            batch[METRIC + "rollout_rejected_fraction"] = constant(check["rollout_rejected"].mean())
        return batch


def _old_logp_and_values(temperature: float, completion_width: int):
    def fn(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        (logp_bt,), _, values_bt = policy_and_values(
            models, batch, temperature, completion_width=completion_width
        )
        return logp_bt, values_bt

    return fn


# --------------------------------------------------------------------------- the loss


def make_loss(p: PpoSpec) -> LossFn:
    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        (logp_bt, *plain), entropy_bt, values_bt = policy_and_values(
            models,
            batch,
            p.temperature,
            with_plain="sft" in batch,
            completion_width=p.max_new_tokens,
        )
        mask_bt = batch["completion_mask"]
        num_tokens = batch["tokens_per_row"].mean() * mask_bt.shape[0]
        value, metrics = policy_objective(p, models, batch, logp_bt, values_bt, num_tokens)
        if "sft" in batch:  # warm-up rows: SFT at temperature 1, the RL metrics are null
            sft = batch["sft"].mean() > 0
            nll = gl.aggregate(-plain[0], mask_bt, "token-mean", num_tokens)
            value = jnp.where(sft, nll, value)
            metrics = {k: jnp.where(sft, jnp.nan, v) for k, v in metrics.items()}
            metrics["sft_loss"] = jnp.where(sft, jax.lax.stop_gradient(nll), jnp.nan)
        metrics["entropy"] = pl.masked_mean(entropy_bt, mask_bt)
        for key, column in batch.items():
            if key.startswith(METRIC):
                metrics[key.removeprefix(METRIC)] = column.mean()
        return value, metrics

    return loss


def policy_objective(
    p: PpoSpec,
    models: Models,  # noqa: ARG001
    batch: Mapping[str, jax.Array],
    logp_bt: jax.Array,
    values_bt: jax.Array,
    num_tokens: jax.Array,
) -> tuple[jax.Array, Metrics]:
    """PPO's loss with verl's extras: the clipped (or dual-clip) policy term, plus
    klLossCoef x KL(pi || pi_ref) with useKlLoss, gated by ``policy_on`` (critic warm-up: 0, so
    the policy gets no gradient), plus valueCoef x the value loss."""
    mask_bt = batch["completion_mask"]
    pg, metrics = pl.policy_loss(
        logp_bt,
        batch["old_logp"],
        batch["advantages"],
        mask_bt,
        eps=p.epsilon,
        eps_high=p.epsilon_high,
        num_tokens=num_tokens,
    )
    if p.clip_ratio_c is not None:
        pg, dual = pl.dual_clip_policy_loss(
            logp_bt,
            batch["old_logp"],
            batch["advantages"],
            mask_bt,
            eps=p.epsilon,
            eps_high=p.epsilon_high,
            clip_ratio_c=p.clip_ratio_c,
            num_tokens=num_tokens,
        )
        metrics["policy_loss"] = dual["policy_loss"]
        metrics["pg_clipfrac_lower"] = dual["clip_fraction_dual"]  # verl's name
    if p.use_kl_loss:
        kl = pl.kl_loss(
            logp_bt,
            batch["ref_logp"],
            mask_bt,
            kl_loss_type=p.kl_loss_type,
            num_tokens=num_tokens,
        )
        pg = pg + p.kl_loss_coef * kl
        metrics["kl_loss"] = jax.lax.stop_gradient(kl)
    if "policy_on" in batch:
        on = batch["policy_on"].mean()
        pg = on * pg
        metrics["policy_on"] = on
    vf, value_metrics = pl.value_loss(
        values_bt,
        batch["old_values"],
        batch["returns"],
        mask_bt,
        clip_range=p.value_clip_range,
        num_tokens=num_tokens,
    )
    return pg + p.value_coef * vf, {**metrics, **value_metrics}


# --------------------------------------------------------------------------- build


def columns(spec: Any) -> dict[str, Column]:
    """One mini-batch (``PpoSource``): batchSize rows of maxPromptLength + maxNewTokens tokens."""
    p = spec.settings
    R, L = spec.training.batch_size, spec.data.max_prompt_length + p.max_new_tokens
    i32, f32 = np.int32, np.float32
    out: dict[str, Column] = {k: ((R, L), i32) for k in ("input_ids", "attention_mask", "targets")}
    for name in ("completion_mask", "old_logp", "old_values", "advantages", "returns"):
        out[name] = ((R, L), f32)
    out["tokens_per_row"] = ((R,), f32)
    if p.sft_warmup_steps:
        out["sft"] = ((R,), f32)
    if p.use_kl_loss:
        out["ref_logp"] = ((R, L), f32)
    if p.critic_warmup_steps:
        out["policy_on"] = ((R,), f32)
    return out


def declare(spec: Any, configs: ModelConfigs) -> Declaration:  # noqa: ARG001
    p = spec.settings
    assert isinstance(p, PpoSpec)

    def heads(build: HeadBuilder) -> dict[str, nnx.Module]:
        hidden = build.config.hidden_size
        if p.critic == "value-head":
            return {VALUE: ValueHead(hidden, rngs=build.rngs)}
        plain = spec.model.model_copy(update={"lora": None, "quantization": None})
        return {VALUE: SeparateCritic(build.model(plain), hidden, rngs=build.rngs)}

    rows = spec.training.batch_size * p.num_mini_batches
    return Declaration(
        loss=make_loss(p),
        columns=columns(spec),
        heads=heads,
        reference=p.needs_reference,  # the KL penalty in the rewards or the KL loss
        learning_rates={VALUE: p.value_learning_rate} if p.value_learning_rate else {},
        # critic warm-up: the policy's optimizer update is skipped, not just its gradient zeroed
        policy_idle_steps=(
            (p.sft_warmup_steps, p.sft_warmup_steps + p.critic_warmup_steps)
            if p.critic_warmup_steps
            else None
        ),
        rollout=RolloutShape(rows, spec.data.max_prompt_length, SamplingSettings.of(p)),
    )


def build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    p = spec.settings
    assert isinstance(p, PpoSpec)
    if p.sft_warmup_steps >= spec.training.steps:
        raise ValueError(
            f"spec.ppo.sftWarmupSteps ({p.sft_warmup_steps}) must be less than "
            f"spec.training.steps ({spec.training.steps}): no steps would be left for RL"
        )
    rewards = rw.build_rewards(p.rewards, "spec.ppo.rewards")
    warmup = p.sft_warmup_steps > 0
    prompts = load_prompts(spec.data.train, ctx.tokenizer, spec.data, completion=warmup)
    eval_prompts = (
        load_prompts(spec.data.eval, ctx.tokenizer, spec.data) if spec.data.eval else None
    )
    engine = RolloutEngine(ctx, "ppo", SamplingSettings.of(p), prompts, rewards, eval_prompts)
    source = PpoSource(ctx, engine)
    ctx.log(
        f"ppo: {len(prompts)} prompts, rollout batch {source.rollout_rows} = "
        f"{spec.training.batch_size} per step x {p.num_mini_batches} mini-batches, "
        f"{p.num_iterations} epochs, critic {p.critic}, up to {p.max_new_tokens} new tokens, "
        "rewards: "
        + ", ".join(f"{r.name} (x{r.weight:g})" for r in rewards)
        + (f"; {p.sft_warmup_steps} SFT warm-up steps first" if warmup else "")
    )
    return Algorithm(
        source=source,
        finish=rl_finish(
            ctx, source.evaluate if eval_prompts else None, lambda: source.eval_before
        ),
        evaluate=(lambda: {"eval_reward": source.evaluate(ctx.model())}) if eval_prompts else None,
    )
