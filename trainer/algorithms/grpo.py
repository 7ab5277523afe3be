"""GRPO, GSPO-token, DAPO and Dr. GRPO on the shared loop: rollouts, rewards, group advantages,
the clipped loss. The four read ``spec.grpo``; ``spec.grpo_settings`` fills the fields left unset
with the algorithm's defaults (``GRPO_DEFAULTS`` in the API), so the code below never asks which
algorithm runs, except for the GSPO-token ratio.

Each group of `numIterations` (mu) optimizer steps shares one batch of rollouts:

1. take `training.batchSize` prompts (a seeded order, a pure function of the group index);
2. sample `numGenerations` (G) completions per prompt with the current policy (temperature, top-p,
   top-k, `maxNewTokens`, stop at EOS) with the shared ``RolloutEngine``; the sampler's seed is
   derived from (training.seed, group), so a resumed run samples exactly what an uninterrupted one
   would;
3. score them (`posttrain.trainer.rewards`), add DAPO's soft overlong penalty (`overlong`), and
   normalise advantages within each prompt's group. With `dynamicSampling`, steps 1-3 repeat on
   the next prompts until `batchSize` groups with differing rewards are kept, at most
   `maxSamplingRounds` times (`dynamic_sampling.py`); with `overlong: filter`, truncated
   completions leave the loss mask;
4. old log-probs: recomputed with the *training* forward pass (`ctx.policy_logprobs`), not taken
   from the sampler, whose cached, sampling-time numerics would bias the ratio. With mu = 1 the
   ratio's denominator is the current forward itself (stop-gradient), which is the same number
   without a second pass. Reference log-probs (`ctx.reference_logprobs`: the initial weights, or
   with LoRA the base with adapters off) only when beta > 0;
5. mu optimizer steps on that batch with `grpo_loss` or `gspo_token_loss`.

Per-step metrics that come from the rollouts (rewards, lengths, generation speed) ride in the
batch as per-row columns named `metric/...`; the loss returns their means, so the loop logs them
like any other metric. GSPO-token is registered as its own module (``gspo_token.py``) on this one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.v1alpha1 import OVERLONG_REWARD, GrpoSettings, LossAggregation
from posttrain.trainer import rewards as rw
from posttrain.trainer.algorithms import dynamic_sampling as ds
from posttrain.trainer.algorithms import grpo_loss as gl
from posttrain.trainer.algorithms import overlong
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Batch,
    Context,
    LossFn,
    Metrics,
    Models,
)
from posttrain.trainer.algorithms.report import rl_finish
from posttrain.trainer.algorithms.rollout import (
    Rollout,
    RolloutEngine,
    SamplingSettings,
    decode_array,
    encode_array,
)
from posttrain.trainer.data.prompts import load_prompts
from posttrain.trainer.models.entropy import chunked_logprobs_and_entropy

METRIC = "metric/"
OVERLONG = OVERLONG_REWARD  # the soft overlong penalty's name among the reward terms


@dataclass
class _Round:
    """One round of rollouts, scored: the rewards training uses and what dynamic sampling needs."""

    out: Rollout
    total: np.ndarray  # [R] total reward (with the overlong penalty when on)
    terms: dict[str, np.ndarray]  # name -> [R], the overlong penalty among them
    truncated: np.ndarray  # [R] bool: cut at maxNewTokens
    informative: np.ndarray  # [R / G] bool: the group's rewards differ


# --------------------------------------------------------------------------- the batch source


class RolloutSource:
    """One batch of rollouts per group of mu steps; the same batch for each step of the group.

    The first `sftWarmupSteps` steps instead get teacher-forced batches of the data's completions
    (same array layout, flagged by the `sft` column), so one jitted step serves both phases.
    """

    def __init__(self, ctx: Context, engine: RolloutEngine):
        spec = ctx.spec
        self.ctx = ctx
        self.engine = engine
        self.g: GrpoSettings = spec.grpo_settings
        self.warmup = self.g.sft_warmup_steps
        self.batch_prompts = spec.training.batch_size
        self.rows = self.batch_prompts * self.g.num_generations
        self._group = -1
        self._batch: dict[str, np.ndarray] | None = None
        self._next_prompt = 0  # dynamic sampling: rounds use a variable number of prompts
        self._said_short = False
        self._handed_out: float | None = None
        self._last_tokens = 0.0
        self.eval_before: float | None = None  # greedy reward on data.eval when RL starts

    def next_batch(self, step: int) -> Batch:
        now = time.perf_counter()
        # The loop does not time its step for us: the time from handing out the previous batch
        # to this call is that step's training time (with logging), so the figure lags one step.
        train_seconds = now - self._handed_out if self._handed_out is not None else None
        if step < self.warmup:
            batch = self._warmup_batch(step)
        else:
            if step == self.warmup and self.engine.eval_prompts and self.eval_before is None:
                self.eval_before = self.evaluate(self.ctx.model())
                self.ctx.log(f"greedy reward on data.eval before RL: {self.eval_before:.4f}")
            group = (step - self.warmup) // self.g.num_iterations
            if group != self._group or self._batch is None:
                self._batch = self._rollouts(group)
                self._group = group
            batch = dict(self._batch)
        speed = self._last_tokens / train_seconds if train_seconds else 0.0
        batch[METRIC + "train_tokens_per_second"] = np.full(self.rows, speed, np.float32)
        self._last_tokens = float(batch["attention_mask"].sum())
        self._handed_out = time.perf_counter()
        return batch

    def evaluate(self, model: Any) -> float:
        return self.engine.evaluate(model, self.rows)

    def _warmup_batch(self, step: int) -> dict[str, np.ndarray]:
        """Teacher-forced rows: prompt + the data's completion (+ EOS), cut to maxNewTokens."""
        batch = self.engine.teacher_forced(step * self.rows, self.rows)
        return self._finish_batch(batch, np.zeros(self.rows, np.float32), sft=True)

    def _finish_batch(
        self, batch: dict[str, np.ndarray], adv: np.ndarray, *, sft: bool
    ) -> dict[str, np.ndarray]:
        """The columns every batch has (fixed keys, so the step compiles once)."""
        R = len(adv)
        batch["advantages"] = adv.astype(np.float32)
        # token-mean's denominator per row, so micro-batches average to the whole batch's mean.
        batch["tokens_per_row"] = np.full(R, batch["completion_mask"].sum() / R, np.float32)
        if self.g.overlong.mode == "filter":  # sequence-mean's count, rows without loss left out
            with_loss = (batch["completion_mask"].sum(axis=1) > 0).sum()
            batch["sequences_per_row"] = np.full(R, with_loss / R, np.float32)
        if self.warmup:
            batch["sft"] = np.full(R, float(sft), np.float32)
        if self.g.num_iterations > 1:
            batch["old_logp"] = (
                np.zeros_like(batch["completion_mask"])  # unused: the loss takes the SFT branch
                if sft
                else self.ctx.policy_logprobs(batch, self.g.temperature)
            )
        if self.g.beta > 0:  # never with a warm-up (the API refuses beta > 0 there)
            batch["ref_logp"] = self.ctx.reference_logprobs(batch, self.g.temperature)
        if sft:  # rollout metrics do not exist yet: logged as null
            for name in self._metric_names():
                batch[METRIC + name] = np.full(R, np.nan, np.float32)
        return batch

    def _metric_names(self) -> list[str]:
        names = [*self.engine.metric_names(), "groups_with_equal_rewards", "truncated_fraction"]
        if self.g.overlong.mode == "penalty":
            names.append(f"reward/{OVERLONG}")
        if self.g.dynamic_sampling:
            names += ["groups_filtered_fraction", "sampling_rounds"]
        return names

    def _rollouts(self, group: int) -> dict[str, np.ndarray]:
        """One step's batch: one round of rollouts, or with dynamicSampling as many rounds as it
        takes (at most maxSamplingRounds) to fill the batch with groups whose rewards differ."""
        G, B, e = self.g.num_generations, self.batch_prompts, self.engine
        rounds = self.g.max_sampling_rounds if self.g.dynamic_sampling else 1
        sampled: list[_Round] = []
        for round_ in range(rounds):
            # Without dynamic sampling the prompts are a pure function of the group (as before);
            # with it, of the prompts used so far (saved in the checkpoint).
            start = self._next_prompt if self.g.dynamic_sampling else group * B
            chosen = [e.prompt(start + j) for j in range(B)]
            self._next_prompt = start + B
            rows = [p for p in chosen for _ in range(G)]  # each prompt's G completions adjacent
            seed = ds.round_seed(self.ctx.spec.training.seed, group, round_)
            sampled.append(self._score(e.rollout(self.ctx.model(), rows, seed)))
            if sum(int(r.informative.sum()) for r in sampled) >= B:
                break
        picked = ds.choose_groups([r.informative for r in sampled], B)

        def column(get: Any) -> np.ndarray:
            return ds.gather_rows([get(r) for r in sampled], picked, G)

        arrays = {k: column(lambda r, k=k: r.out.arrays[k]) for k in sampled[0].out.arrays}
        total = column(lambda r: r.total)
        if self.g.overlong.mode == "filter":  # truncated completions carry no loss (DAPO, TRL)
            kept_rows = ~column(lambda r: r.truncated)
            arrays["completion_mask"] = arrays["completion_mask"] * kept_rows[:, None]
        adv = np.asarray(gl.group_advantages(jnp.asarray(total, jnp.float32), G, self.g.advantage))
        equal_rows = ~column(lambda r: np.repeat(r.informative, G))
        adv = np.where(equal_rows, 0.0, adv)  # no signal: exactly 0, whatever r - mean rounds to
        batch = self._finish_batch(arrays, adv, sft=False)

        kept = sum(int(r.informative.sum()) for r in sampled)
        if self.g.dynamic_sampling and kept < B and not self._said_short:
            self._said_short = True
            self.ctx.log(
                f"dynamic sampling: only {kept} of {B} prompts had differing rewards after "
                f"{len(sampled)} rounds (spec.grpo.maxSamplingRounds); training on them, the batch "
                "filled with equal-reward groups (advantage 0); groups_with_equal_rewards shows "
                "how much per step (said once)"
            )
        every = lambda get: np.concatenate([get(r) for r in sampled])  # noqa: E731
        totals, lengths = every(lambda r: r.total), every(lambda r: r.out.lengths)
        values = {
            "reward_mean": totals.mean(),
            "reward_std": totals.std(),
            **{f"reward/{n}": every(lambda r, n=n: r.terms[n]).mean() for n in sampled[0].terms},
            "completion_length": lengths.mean(),
            "truncated_fraction": every(lambda r: r.truncated).mean(),
            "groups_with_equal_rewards": equal_rows.mean(),
            "generation_tokens_per_second": lengths.sum()
            / max(sum(r.out.seconds for r in sampled), 1e-9),
        }
        if self.g.dynamic_sampling:
            values["groups_filtered_fraction"] = 1.0 - every(lambda r: r.informative).mean()
            values["sampling_rounds"] = len(sampled)
        R = len(total)
        for name, value in values.items():  # rollout statistics over every completion sampled
            batch[METRIC + name] = np.full(R, value, np.float32)
        return batch

    def _score(self, out: Rollout) -> _Round:
        """A round's rewards as training sees them: with overlong penalty, plus that term."""
        G, o = self.g.num_generations, self.g.overlong
        prompt_len = self.engine.prompt_len
        cut = overlong.truncated(
            out.arrays["input_ids"][:, prompt_len:],
            out.arrays["attention_mask"][:, prompt_len:],
            self.engine.eos_id,
        )
        total, terms = out.rewards.astype(np.float32), dict(out.reward_terms)
        if o.mode == "penalty":
            assert o.buffer is not None  # resolved() fills it
            penalty = overlong.soft_overlong_penalty(
                out.lengths, self.g.max_new_tokens, o.buffer, o.penalty_factor
            )
            terms[OVERLONG] = penalty
            total = total + penalty
        return _Round(out, total, terms, cut, ds.informative_groups(total, G))

    def state(self) -> dict[str, Any]:
        # Mid-group (mu > 1) the batch was sampled by weights that have since changed: keep it, so
        # a resumed run trains on exactly the same rollouts. The group index gives the seeds;
        # without dynamic sampling it gives the prompts too, with it `next_prompt` does (a step
        # uses as many prompts as its rounds took).
        state: dict[str, Any] = {
            "group": self._group,
            "eval_before": self.eval_before,
            "next_prompt": self._next_prompt,
        }
        if self.g.num_iterations > 1 and self._batch is not None:
            state["batch"] = {k: encode_array(v) for k, v in self._batch.items()}
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        self._group = int(state.get("group", -1))
        self.eval_before = state.get("eval_before")
        self._next_prompt = int(state.get("next_prompt", 0))
        saved = state.get("batch")
        self._batch = None if saved is None else {k: decode_array(v) for k, v in saved.items()}


# --------------------------------------------------------------------------- the loss


def aggregation_args(
    mode: LossAggregation, rows: int, tokens_per_row: jax.Array, max_new_tokens: int
) -> tuple[gl.Aggregation, jax.Array]:
    """``aggregate``'s mode and token-mean denominator for this micro-batch of ``rows`` rows.

    token-mean divides by the whole batch's completion tokens (``tokens_per_row`` is their mean
    per row), so micro-batches add up to the one big batch. Dr. GRPO's constant normaliser, the
    token sum of each completion / maxNewTokens averaged over completions, is token-mean with
    rows x maxNewTokens as the denominator (TRL's ``dr_grpo``, verl's ``seq-mean-token-sum-norm``).
    """
    if mode == "constant-normalizer":
        return "token-mean", jnp.float32(rows * max_new_tokens)
    return mode, tokens_per_row.mean() * rows


def sequence_mean_share(mask_bt: jax.Array, sequences_per_row: jax.Array) -> jax.Array:
    """The factor that makes a micro-batch's sequence-mean add up to the whole batch's when some
    rows carry no loss (overlong filter): ``aggregate`` divides by this micro-batch's completions
    with loss; the whole batch's mean needs its share of the batch's count instead."""
    own = (mask_bt.sum(axis=1) > 0).sum()
    share = sequences_per_row.mean() * mask_bt.shape[0]
    return jnp.where(share > 0, own / jnp.maximum(share, 1e-9), 0.0)


def make_loss(g: GrpoSettings, algorithm: str) -> LossFn:
    objective = gl.gspo_token_loss if algorithm == "gspo-token" else gl.grpo_loss
    eps, eps_high = g.clip_range(algorithm)

    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        # SFT warm-up rows (flag `sft`) have no rollout: they train at temperature 1.
        sft = batch["sft"].mean() > 0 if "sft" in batch else None
        # One forward; log-probs and entropy chunk by chunk from its hidden states, never as
        # [B, T, V] logits. At the sampling temperature: the ratio and the KL must see the policy
        # that sampled, and the entropy is the sampling distribution's.
        hidden_bte, _ = models.policy.hidden_states(batch["input_ids"], batch["attention_mask"])
        (logp_bt, *plain), entropy_bt = chunked_logprobs_and_entropy(
            hidden_bte,
            models.policy.logits,
            batch["targets"],
            temperatures=(g.temperature, 1.0) if sft is not None else (g.temperature,),
            entropy_temperature=g.temperature,
        )
        mask_bt = batch["completion_mask"]
        rows = mask_bt.shape[0]
        num_tokens = batch["tokens_per_row"].mean() * rows  # token-mean's (the SFT warm-up's)
        aggregation, denominator = aggregation_args(
            g.loss_aggregation, rows, batch["tokens_per_row"], g.max_new_tokens
        )
        # SFT warm-up rows have no old log-probs either: theirs are the current ones.
        current_bt = jax.lax.stop_gradient(logp_bt)
        old_logp_bt = batch["old_logp"] if "old_logp" in batch else current_bt
        if sft is not None:
            old_logp_bt = jnp.where(sft, current_bt, old_logp_bt)
        value, metrics = objective(
            logp_bt,
            old_logp_bt,
            batch.get("ref_logp"),
            batch["advantages"],
            mask_bt,
            eps=eps,
            eps_high=eps_high,
            beta=g.beta,
            kl_estimator=g.kl_estimator,
            aggregation=aggregation,
            num_tokens=denominator,
        )
        if aggregation == "sequence-mean" and "sequences_per_row" in batch:
            scale = sequence_mean_share(mask_bt, batch["sequences_per_row"])
            value, metrics["policy_loss"] = value * scale, metrics["policy_loss"] * scale
        if sft is not None:
            nll = gl.aggregate(-plain[0], mask_bt, "token-mean", num_tokens)
            value = jnp.where(sft, nll, value)
            metrics = {k: jnp.where(sft, jnp.nan, v) for k, v in metrics.items()}
            metrics["sft_loss"] = jnp.where(sft, jax.lax.stop_gradient(nll), jnp.nan)
        metrics["entropy"] = (entropy_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)
        for key, column in batch.items():
            if key.startswith(METRIC):
                metrics[key.removeprefix(METRIC)] = column.mean()
        return value, metrics

    return loss


# --------------------------------------------------------------------------- build


def build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    g = spec.grpo_settings
    if g is None:  # the API refuses this already; keep the message if it is ever bypassed
        raise ValueError(f"spec.grpo: algorithm {spec.algorithm} needs spec.grpo")
    if g.sft_warmup_steps >= spec.training.steps:
        raise ValueError(
            f"spec.grpo.sftWarmupSteps ({g.sft_warmup_steps}) must be less than "
            f"spec.training.steps ({spec.training.steps}): no steps would be left for RL"
        )
    rewards = rw.build_rewards(g.rewards)
    warmup = g.sft_warmup_steps > 0
    prompts = load_prompts(spec.data.train, ctx.tokenizer, spec.data, completion=warmup)
    eval_prompts = (
        load_prompts(spec.data.eval, ctx.tokenizer, spec.data) if spec.data.eval else None
    )
    engine = RolloutEngine(ctx, "grpo", SamplingSettings.of(g), prompts, rewards, eval_prompts)
    source = RolloutSource(ctx, engine)
    ctx.log(
        f"{spec.algorithm}: {len(prompts)} prompts, {spec.training.batch_size} per step x "
        f"G={g.num_generations}, up to {g.max_new_tokens} new tokens, rewards: "
        + ", ".join(f"{r.name} (x{r.weight:g})" for r in rewards)
        + (f"; {g.sft_warmup_steps} SFT warm-up steps first" if warmup else "")
    )
    ctx.log(  # the settings after the algorithm's defaults, so a run says what it does
        f"{spec.algorithm}: beta {g.beta:g}, epsilon {g.epsilon:g} / {g.epsilon_high:g}, "
        f"advantage {g.advantage}, loss {g.loss_aggregation}, dynamic sampling "
        + (f"on (up to {g.max_sampling_rounds} rounds)" if g.dynamic_sampling else "off")
        + f", overlong {g.overlong.mode}"
        + (f" (buffer {g.overlong.buffer})" if g.overlong.mode == "penalty" else "")
    )
    return Algorithm(
        name=spec.algorithm,
        loss=make_loss(g, spec.algorithm),
        source=source,
        finish=rl_finish(
            ctx, source.evaluate if eval_prompts else None, lambda: source.eval_before
        ),
        reference=g.beta > 0,  # only the KL term reads it
    )
