"""The GRPO family on the shared loop: rollouts, rewards, advantages, the clipped loss.

GRPO and its variants (GSPO-token, DAPO, Dr. GRPO, RLOO, REINFORCE++) share this module. Each
variant's settings type (``posttrain/api/settings/``) holds its defaults; its trainer module calls
``family(...)`` with the parts it registered in ``parts.py`` (an advantage estimator, a policy
objective). Nothing here asks which algorithm runs.

Every `numIterations` (mu) x `numMiniBatches` optimizer steps share one rollout batch (index i):

1. take `training.batchSize` x `numMiniBatches` prompts (a seeded order, a pure function of i);
2. sample `numGenerations` (G) completions per prompt with the current policy (temperature, top-p,
   top-k, `maxNewTokens`, stop at EOS) with the shared ``RolloutEngine``; the sampler's seed is
   derived from (training.seed, i), so a resumed run samples exactly what an uninterrupted one
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
5. mu passes over that batch, each a seeded permutation of its rows cut into `numMiniBatches`
   optimizer steps of batchSize x G rows, with `grpo_loss` or `gspo_token_loss`; the first step
   runs on the weights that sampled, so its ratio is exactly 1 (``on_policy``). With
   ``rolloutCorrection`` on, old log-probs are computed here also at mu = 1, and the TIS weights
   and rejection mask are applied (``correct``).

Per-step metrics that come from the rollouts (rewards, lengths, generation speed) ride in the
batch as per-row columns named `metric/...`; the loss returns their means, so the loop logs them
like any other metric. Each variant is its own module on this one (``gspo_token.py``, ``dapo.py``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.algorithms import REGISTRY
from posttrain.api.settings.grpo import OVERLONG_REWARD, GrpoSpec, LossAggregation
from posttrain.trainer import rewards as rw
from posttrain.trainer.algorithms import dynamic_sampling as ds
from posttrain.trainer.algorithms import grpo_loss as gl
from posttrain.trainer.algorithms import overlong, parts
from posttrain.trainer.algorithms import rollout_correction as rc
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Column,
    Context,
    Declaration,
    LossFn,
    Metrics,
    ModelConfigs,
    Models,
    RolloutShape,
)
from posttrain.trainer.algorithms.report import rl_finish
from posttrain.trainer.algorithms.rollout import (
    METRIC,
    Rollout,
    RolloutBatchSource,
    RolloutEngine,
    SamplingSettings,
    mini_batch_order,
)
from posttrain.trainer.data.prompts import load_prompts
from posttrain.trainer.loop_step import contiguous_micro_order
from posttrain.trainer.models import shared_prefix
from posttrain.trainer.models.entropy import chunked_logprobs_and_entropy
from posttrain.trainer.models.logprobs import scored_window

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


class RolloutSource(RolloutBatchSource):
    """One rollout batch per numIterations x numMiniBatches steps: batchSize x numMiniBatches
    prompts x G completions, each step training on batchSize x G of them (with one mini-batch,
    the whole batch mu times; with several, a seeded permutation per pass cut into mini-batches,
    PPO's ``mini_batch_order``).

    The first `sftWarmupSteps` steps instead get teacher-forced batches of the data's completions
    (same array layout, flagged by the `sft` column), so one jitted step serves both phases.
    """

    def __init__(self, ctx: Context, engine: RolloutEngine, estimator: parts.Estimator):
        g = ctx.spec.settings
        assert isinstance(g, GrpoSpec)
        super().__init__(
            ctx,
            engine,
            warmup=g.sft_warmup_steps,
            steps_per_rollout=g.num_iterations * g.num_mini_batches,
        )
        self.g = g
        self.estimator = estimator
        self.correction = g.rollout_correction
        self.batch_prompts = ctx.spec.training.batch_size * g.num_mini_batches  # per rollout
        self.rows = ctx.spec.training.batch_size * g.num_generations  # per optimizer step
        self.rollout_rows = self.batch_prompts * g.num_generations
        self._next_prompt = 0  # dynamic sampling: rounds use a variable number of prompts
        self._said_short = False
        self._handed_out: float | None = None
        self._last_tokens = 0.0
        self.width = _completion_width(g, ctx.spec)  # the rows' completion part (scored_window)
        self.prompt_group = rollout_prompt_group(g)  # the no-gradient passes' shared prompts
        self.update_group = update_prompt_group(g, ctx.spec.training)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        now = time.perf_counter()
        # The loop does not time its step for us: the time from handing out the previous batch
        # to this call is that step's training time (with logging), so the figure lags one step.
        train_seconds = now - self._handed_out if self._handed_out is not None else None
        batch = super().next_batch(step)
        speed = self._last_tokens / train_seconds if train_seconds else 0.0
        self.host_metrics["train_tokens_per_second"] = speed
        self._last_tokens = float(batch["attention_mask"].sum())
        self._handed_out = time.perf_counter()
        return batch

    def evaluate(self, model: Any) -> float:
        return self.engine.evaluate(model, self.rollout_rows)

    def warmup_batch(self, step: int) -> dict[str, np.ndarray]:
        """Teacher-forced rows: prompt + the data's completion (+ EOS), cut to maxNewTokens."""
        batch = self.engine.teacher_forced(step * self.rows, self.rows)
        shape = batch["completion_mask"].shape if self.estimator.per_token else (self.rows,)
        return self._step_columns(self._finish_batch(batch, np.zeros(shape, np.float32), sft=True))

    def step_batch(self, batch: dict[str, np.ndarray], index: int, k: int) -> dict[str, np.ndarray]:
        """Step k of rollout batch ``index``: the whole batch (one mini-batch), or mini-batch
        k mod numMiniBatches of pass k // numMiniBatches's seeded permutation."""
        passes, mini = divmod(k, self.g.num_mini_batches)
        if self.g.num_mini_batches == 1:
            part = dict(batch)
        else:
            order = mini_batch_order(self.rollout_rows, self.ctx.spec.training.seed, index, passes)
            rows = order[mini * self.rows : (mini + 1) * self.rows]
            part = {key: value[rows] for key, value in batch.items()}
        return self._step_columns(part, first=k == 0)

    def _step_columns(
        self, batch: dict[str, np.ndarray], *, first: bool = True
    ) -> dict[str, np.ndarray]:
        """The columns that depend on the step's rows (fixed keys, so the step compiles once)."""
        R = len(batch["completion_mask"])
        # token-mean's denominator per row, so micro-batches average to the step batch's mean.
        batch["tokens_per_row"] = np.full(R, batch["completion_mask"].sum() / R, np.float32)
        if self.g.overlong.mode == "filter":  # sequence-mean's count, rows without loss left out
            with_loss = (batch["completion_mask"].sum(axis=1) > 0).sum()
            batch["sequences_per_row"] = np.full(R, with_loss / R, np.float32)
        if self.steps_per_rollout > 1:
            # The first step of a rollout batch runs on the weights that sampled it: its ratio's
            # denominator is the current forward itself (exactly 1), as with mu = 1.
            batch["on_policy"] = np.full(R, float(first), np.float32)
        micro_rows = self.ctx.micro_rows or R
        if self.update_group > 1 and micro_rows < R:
            # The step takes strided rows per micro-batch (loop_step.split_micro); this order
            # gives each micro-batch a contiguous block of whole groups instead. The loss is a
            # mean over rows, so only which micro-batch computes a row changes.
            num_micro = R // micro_rows
            order = contiguous_micro_order(R, num_micro)
            batch = {key: value[order] for key, value in batch.items()}
            for m in range(num_micro):  # what split_micro will hand the loss
                micro = {key: batch[key][m::num_micro] for key in ("input_ids", "attention_mask")}
                check_prompt_runs(micro, self.update_group, self.width)
        return batch

    def _finish_batch(
        self, batch: dict[str, np.ndarray], adv: np.ndarray, *, sft: bool
    ) -> dict[str, np.ndarray]:
        """The rollout batch's columns (fixed keys, so the step compiles once)."""
        R = len(adv)
        batch["advantages"] = adv.astype(np.float32)
        scored = scored_window(batch["completion_mask"].shape[1], self.width)
        if batch["completion_mask"][:, : scored.start].any():  # the loss would read zeros there
            raise AssertionError(f"completion tokens before the last {self.width} positions")
        if self.warmup:
            batch["sft"] = np.full(R, float(sft), np.float32)
        group = 1 if sft else self._checked_group(batch)  # SFT rows are not groups
        needs_old = needs_old_logp(self.g)
        if needs_old and "old_logp" not in batch:
            batch["old_logp"] = (
                np.zeros_like(batch["completion_mask"])  # unused: the loss takes the SFT branch
                if sft
                else self.ctx.policy_logprobs(batch, self.g.temperature, self.width, group)
            )
        if not needs_old:
            batch.pop("old_logp", None)
        if self.correction.enabled and not is_in_loss(self.g):
            correct(batch, self.correction, sft=sft)
        if self.g.beta > 0 and not self.estimator.kl_in_reward and "ref_logp" not in batch:
            batch["ref_logp"] = self.ctx.reference_logprobs(
                batch, self.g.temperature, self.width, group
            )
        if self.estimator.kl_in_reward:
            batch.pop("ref_logp", None)  # the KL is in the advantages already
        if sft:  # rollout metrics do not exist yet: logged as null
            for name in self._metric_names():
                batch[METRIC + name] = np.full(R, np.nan, np.float32)
        return batch

    def _checked_group(self, batch: Mapping[str, np.ndarray]) -> int:
        """``prompt_group``, after checking that the rollout rows are its runs."""
        if self.prompt_group > 1:
            check_prompt_runs(batch, self.prompt_group, self.width)
        return self.prompt_group

    def _metric_names(self) -> list[str]:
        names = [*self.engine.metric_names(), "groups_with_equal_rewards", "truncated_fraction"]
        if self.correction.rejection != "none":
            names.append("rollout_rejected_fraction")
        if self.g.overlong.mode == "penalty":
            names.append(f"reward/{OVERLONG}")
        if self.g.dynamic_sampling:
            names += ["groups_filtered_fraction", "sampling_rounds"]
        return names

    def rollout_request(self, index: int, round_: int = 0) -> tuple[list[Any], int]:
        """Round ``round_`` of rollout batch ``index``: its prompts, each G times in a row, and
        the sampler's seed. Without dynamic sampling the prompts are a pure function of the index;
        with it, of the prompts used so far (``next_prompt``, saved in the checkpoint)."""
        G, B, start = self.g.num_generations, self.batch_prompts, self._first_prompt(index)
        rows = [p for p in (self.engine.prompt(start + j) for j in range(B)) for _ in range(G)]
        return rows, ds.round_seed(self.ctx.spec.training.seed, index, round_)

    def _first_prompt(self, index: int) -> int:
        return self._next_prompt if self.g.dynamic_sampling else index * self.batch_prompts

    def make_rollout(self, index: int) -> dict[str, np.ndarray]:
        """One rollout batch: one round of rollouts, or with dynamicSampling as many rounds as it
        takes (at most maxSamplingRounds) to fill the batch with groups whose rewards differ."""
        G, B = self.g.num_generations, self.batch_prompts
        rounds = self.g.max_sampling_rounds if self.g.dynamic_sampling else 1
        sampled: list[_Round] = []
        for round_ in range(rounds):
            rows, seed = self.rollout_request(index, round_)
            self._next_prompt = self._first_prompt(index) + B
            sampled.append(self._score(self.sample(index, rows, seed)))
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
        equal_rows = ~column(lambda r: np.repeat(r.informative, G))
        adv = self._advantages(arrays, total)
        if not self.estimator.kl_in_reward:  # no signal: exactly 0, whatever r - mean rounds to
            adv = np.where(equal_rows if adv.ndim == 1 else equal_rows[:, None], 0.0, adv)
        batch = self._finish_batch(arrays, adv, sft=False)

        kept = sum(int(r.informative.sum()) for r in sampled)
        if self.g.dynamic_sampling and kept < B and not self._said_short:
            self._said_short = True
            self.ctx.log(
                f"dynamic sampling: only {kept} of {B} prompts had differing rewards after "
                f"{len(sampled)} rounds (spec.{REGISTRY[self.ctx.spec.algorithm].block}"
                ".maxSamplingRounds); training on them, the batch "
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
        }
        self.host_metrics["generation_tokens_per_second"] = float(
            lengths.sum() / max(sum(r.out.seconds for r in sampled), 1e-9)
        )
        extra = [getattr(r.out, "metrics", {}) for r in sampled]  # multi-turn: turns, tools, ...
        values.update({k: np.mean([e[k] for e in extra]) for k in extra[0]})
        if self.g.dynamic_sampling:
            values["groups_filtered_fraction"] = 1.0 - every(lambda r: r.informative).mean()
            values["sampling_rounds"] = len(sampled)
        if "rollout_rejected" in batch:
            values["rollout_rejected_fraction"] = float(batch.pop("rollout_rejected").mean())
        R = len(total)
        for name, value in values.items():  # rollout statistics over every completion sampled
            batch[METRIC + name] = np.full(R, value, np.float32)
        return batch

    def _score(self, out: Rollout) -> _Round:
        """A round's rewards as training sees them: with overlong penalty, plus that term."""
        G, o = self.g.num_generations, self.g.overlong
        prompt_len = self.engine.prompt_len
        # Multi-turn rollouts say which episodes were cut and how long their longest turn was.
        cut = getattr(out, "truncated", None)
        if cut is None:
            cut = overlong.truncated(
                out.arrays["input_ids"][:, prompt_len:],
                out.arrays["attention_mask"][:, prompt_len:],
                self.engine.eos_ids,
            )
        total, terms = out.rewards.astype(np.float32), dict(out.reward_terms)
        if o.mode == "penalty":
            assert o.buffer is not None  # GrpoSpec fills it when the job is read
            penalty = overlong.soft_overlong_penalty(
                getattr(out, "longest_turn", out.lengths),
                self.g.max_new_tokens,
                o.buffer,
                o.penalty_factor,
            )
            terms[OVERLONG] = penalty
            total = total + penalty
        return _Round(out, total, terms, cut, ds.informative_groups(total, G))

    def _advantages(self, arrays: dict[str, np.ndarray], total: np.ndarray) -> np.ndarray:
        """The registered estimator on this batch; with the KL in the reward (RLOO, REINFORCE++)
        it gets the per-token log pi_old - log pi_ref (k1, as verl and TRL put it in the reward)."""
        kl = None
        if self.estimator.kl_in_reward and self.g.beta > 0:
            group = self._checked_group(arrays)
            old = self.ctx.policy_logprobs(arrays, self.g.temperature, self.width, group)
            ref = self.ctx.reference_logprobs(arrays, self.g.temperature, self.width, group)
            arrays["old_logp"] = old  # the ratio's denominator when mu > 1: no second pass
            kl = (old - ref) * arrays["completion_mask"]
        inputs = parts.AdvantageInputs(
            rewards=total,
            group_size=self.g.num_generations,
            mask=arrays["completion_mask"],
            kl=kl,
            kl_coef=self.g.beta,
        )
        return np.asarray(self.estimator.fn(inputs), np.float32)

    def extra_state(self) -> dict[str, Any]:
        # Without dynamic sampling the rollout index gives the prompts; with it `next_prompt`
        # does (a step uses as many prompts as its rounds took).
        return {"next_prompt": self._next_prompt}

    def restore_extra(self, state: Mapping[str, Any]) -> None:
        self._next_prompt = int(state.get("next_prompt", 0))


def is_in_loss(g: GrpoSpec) -> bool:
    """TIS computed inside the loss, from the step's own forward: with one optimizer step per
    rollout batch pi_old is the current policy, so the separate no-grad pass that the host-side
    correction needs would recompute the very log-probs the step computes anyway. Rejection
    changes the mask, whose token counts the host needs first: it stays on the host."""
    c = g.rollout_correction
    steps_per_rollout = g.num_iterations * g.num_mini_batches
    return steps_per_rollout == 1 and c.importance_sampling != "none" and c.rejection == "none"


def needs_old_logp(g: GrpoSpec) -> bool:
    """Whether the rollout batch carries pi_old's log-probs, from a no-grad pass."""
    steps_per_rollout = g.num_iterations * g.num_mini_batches
    return steps_per_rollout > 1 or (g.rollout_correction.enabled and not is_in_loss(g))


def correct(batch: dict[str, np.ndarray], c: Any, *, sft: bool = False) -> None:
    """Rollout correction on a rollout batch with ``old_logp`` and ``sampler_logp``, in place:
    rejection drops tokens or completions from ``completion_mask`` (its share of completions as
    ``rollout_rejected``, [R] bool); TIS writes ``is_weights`` [R, L], the loss's per-token
    weights of the policy-gradient term. Warm-up rows (``sft``) get weights 1 and keep their mask.
    """
    mask = batch["completion_mask"]
    old, sampler = jnp.asarray(batch["old_logp"]), jnp.asarray(batch["sampler_logp"])
    if c.importance_sampling != "none":
        batch["is_weights"] = (
            np.ones_like(mask)
            if sft
            else np.asarray(
                rc.token_is_weights(
                    old, sampler, jnp.asarray(mask), c.importance_sampling_threshold
                ),
                np.float32,
            )
        )
    if c.rejection != "none" and not sft:
        kept = np.asarray(
            rc.rejection_mask(
                old,
                sampler,
                jnp.asarray(mask),
                c.rejection,
                c.rejection_threshold,
                c.rejection_threshold_lower,
                c.veto_threshold,
            ),
            np.float32,
        )
        had = mask.sum(axis=1) > 0
        batch["rollout_rejected"] = had & (kept.sum(axis=1) < mask.sum(axis=1))
        batch["completion_mask"] = kept


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


def make_loss(
    g: GrpoSpec,
    objective_name: str = "grpo",
    *,
    kl_in_reward: bool = False,
    completion_width: int | None = None,
    prompt_group: int = 1,
) -> LossFn:
    """The step's loss. ``completion_width`` (the rows' completion part, ``_completion_width``):
    only the positions that predict those tokens run the LM head (``scored_window``).
    ``prompt_group`` (``update_prompt_group``): the micro-batch's rows come in runs of that many
    completions of one prompt, whose prompt runs through the model once."""
    objective = parts.objective(objective_name)
    eps, eps_high = g.epsilon, g.clip_high
    beta = 0.0 if kl_in_reward else g.beta  # in the reward, the advantages carry it
    c, tis_in_loss = g.rollout_correction, is_in_loss(g)

    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        # SFT warm-up rows (flag `sft`) have no rollout: they train at temperature 1.
        sft = batch["sft"].mean() > 0 if "sft" in batch else None
        # One forward; log-probs and entropy chunk by chunk from its hidden states, never as
        # [B, T, V] logits. At the sampling temperature: the ratio and the KL must see the policy
        # that sampled, and the entropy is the sampling distribution's.
        hidden_bte = shared_prefix.rollout_hidden(
            models.policy,
            batch["input_ids"],
            batch["attention_mask"],
            completion_width=completion_width,
            prompt_group=prompt_group,
        )
        (logp_bt, *plain), entropy_bt = chunked_logprobs_and_entropy(
            hidden_bte,
            models.policy.logits,
            batch["targets"],
            temperatures=(g.temperature, 1.0) if sft is not None else (g.temperature,),
            entropy_temperature=g.temperature,
            completion_width=completion_width,
        )
        mask_bt = batch["completion_mask"]
        rows = mask_bt.shape[0]
        num_tokens = batch["tokens_per_row"].mean() * rows  # token-mean's (the SFT warm-up's)
        aggregation, denominator = aggregation_args(
            g.loss_aggregation, rows, batch["tokens_per_row"], g.max_new_tokens
        )
        # SFT warm-up rows have no old log-probs either: theirs are the current ones. The first
        # step on a rollout batch runs on the weights that sampled it (``on_policy``): its
        # ratio's denominator is the current forward itself, so the ratio is exactly 1.
        current_bt = jax.lax.stop_gradient(logp_bt)
        old_logp_bt = batch["old_logp"] if "old_logp" in batch else current_bt
        if "on_policy" in batch:
            old_logp_bt = jnp.where(batch["on_policy"].mean() > 0, current_bt, old_logp_bt)
        if sft is not None:
            old_logp_bt = jnp.where(sft, current_bt, old_logp_bt)
        adv = batch["advantages"]
        if "is_weights" in batch:  # TIS: w >= 0 scales -min(r A, clip(r) A) exactly as w A does
            adv = (adv[:, None] if adv.ndim == 1 else adv) * batch["is_weights"]
        elif tis_in_loss:  # the same weights, pi_old being this step's own forward (is_in_loss)
            weights = rc.token_is_weights(
                current_bt, batch["sampler_logp"], mask_bt, c.importance_sampling_threshold
            )
            adv = (adv[:, None] if adv.ndim == 1 else adv) * weights
        value, metrics = objective(
            logp_bt,
            old_logp_bt,
            batch.get("ref_logp"),
            adv,
            mask_bt,
            eps=eps,
            eps_high=eps_high,
            beta=beta,
            kl_estimator=g.kl_estimator,
            aggregation=aggregation,
            num_tokens=denominator,
        )
        if "sampler_logp" in batch:  # the sampler against the learner's pi_old, always logged
            learner_bt = batch["old_logp"] if "old_logp" in batch else current_bt
            metrics.update(rc.mismatch_metrics(learner_bt, batch["sampler_logp"], mask_bt))
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


# --------------------------------------------------------------------------- declare, build


def columns(g: GrpoSpec, spec: Any, estimator: parts.Estimator) -> dict[str, Column]:
    """The step's batch (``RolloutSource._finish_batch``): batchSize x G rows of
    maxPromptLength + maxNewTokens tokens (the run's prompt width is at most that); with an
    environment, maxPromptLength + its room (``EnvironmentSpec.room``)."""
    R, L = spec.training.batch_size * g.num_generations, spec.data.max_prompt_length
    L += _completion_width(g, spec)
    i32, f32 = np.int32, np.float32
    out: dict[str, Column] = {
        "input_ids": ((R, L), i32),
        "attention_mask": ((R, L), i32),
        "targets": ((R, L), i32),
        "completion_mask": ((R, L), f32),
        "tokens_per_row": ((R,), f32),
        "advantages": ((R, L) if estimator.per_token else (R,), f32),
    }
    if g.environment is None:  # multi-turn episodes carry no sampler log-probs yet
        out["sampler_logp"] = ((R, L), f32)
    steps_per_rollout = g.num_iterations * g.num_mini_batches
    c = g.rollout_correction
    if g.overlong.mode == "filter":
        out["sequences_per_row"] = ((R,), f32)
    if g.sft_warmup_steps:
        out["sft"] = ((R,), f32)
    if steps_per_rollout > 1:
        out["on_policy"] = ((R,), f32)
    if needs_old_logp(g):
        out["old_logp"] = ((R, L), f32)
    if c.importance_sampling != "none" and not is_in_loss(g):
        out["is_weights"] = ((R, L), f32)
    if g.beta > 0 and not estimator.kl_in_reward:
        out["ref_logp"] = ((R, L), f32)
    return out


def rollout_prompt_group(g: GrpoSpec) -> int:
    """G where a rollout batch's rows may share their prompt's forward (``sharePromptForward``):
    runs of G completions of one prompt, in order; 1 where they are not (multi-turn episodes,
    whose turns differ per row) or it is off."""
    if not g.share_prompt_forward or g.environment is not None:
        return 1
    return g.num_generations


def update_prompt_group(g: GrpoSpec, training: Any) -> int:
    """``rollout_prompt_group`` for the update's micro-batches (the step batch's rows reordered
    so that each holds whole groups: ``RolloutSource._step_columns``), or 1 where the step's rows
    are not whole groups in order (mini-batches permute rows, SFT warm-up rows are not groups) or
    the shared forward would cost memory the job counts on (it runs the layers unrolled, without
    remat)."""
    plain = training.remat == "none" and not training.scan_layers
    if g.num_mini_batches > 1 or g.sft_warmup_steps or not plain:
        return 1
    return rollout_prompt_group(g)


def check_prompt_runs(batch: Mapping[str, np.ndarray], group: int, width: int) -> None:
    """The shared prompt forward reads each run's first row for the whole run: the rollout rows
    must come in runs of ``group`` with equal prompt columns (all but the last ``width``)."""
    prompt = slice(0, batch["input_ids"].shape[1] - width)
    columns = (np.asarray(batch[key])[:, prompt] for key in ("input_ids", "attention_mask"))
    shared_prefix.check_prompt_runs(
        columns, group, "sharePromptForward: false turns the shared prompt forward off"
    )


def _completion_width(g: GrpoSpec, spec: Any) -> int:
    """Tokens after the prompt: one completion, or an environment's turns and observations."""
    env, d = g.environment, spec.data
    if env is None:
        return g.max_new_tokens
    return env.room(g.max_new_tokens, d.max_length, d.max_prompt_length)


def family(objective: str = "grpo") -> tuple[Any, Any]:
    """``(declare, build)`` of a GRPO-family algorithm whose policy objective is ``objective``
    (registered in ``parts``); its advantage estimator is the one its settings name."""

    def declare(spec: Any, configs: ModelConfigs) -> Declaration:  # noqa: ARG001
        g = spec.settings
        assert isinstance(g, GrpoSpec)
        estimator = parts.advantage(g.advantage)
        rows = spec.training.batch_size * g.num_mini_batches * g.num_generations
        return Declaration(
            loss=make_loss(
                g,
                objective,
                kl_in_reward=estimator.kl_in_reward,
                completion_width=_completion_width(g, spec),
                prompt_group=update_prompt_group(g, spec.training),
            ),
            columns=columns(g, spec, estimator),
            reference=g.beta > 0,  # only the KL reads it
            # The sampler's widest context: with an environment, the last turn's (prompt, earlier
            # turns and observations).
            rollout=RolloutShape(
                rows,
                spec.data.max_prompt_length + max(0, _completion_width(g, spec) - g.max_new_tokens),
                SamplingSettings.of(g),
            ),
        )

    def build(ctx: Context) -> Algorithm:
        return _build(ctx)

    return declare, build


def _build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    g = spec.settings
    assert isinstance(g, GrpoSpec)
    name = REGISTRY[spec.algorithm].block  # the block the job writes: drGrpo, not dr-grpo
    block = f"spec.{name}"
    if g.sft_warmup_steps >= spec.training.steps:
        raise ValueError(
            f"{block}.sftWarmupSteps ({g.sft_warmup_steps}) must be less than "
            f"spec.training.steps ({spec.training.steps}): no steps would be left for RL"
        )
    rewards = rw.build_rewards(
        g.rewards, f"{block}.rewards", reward_model=_reward_model_factory(ctx)
    )
    warmup = g.sft_warmup_steps > 0
    engine: Any
    if g.environment is not None:  # multi-turn episodes (multiturn.py)
        prompts, eval_prompts, engine = _multiturn(ctx, name, rewards, warmup)
    else:
        prompts = load_prompts(spec.data.train, ctx.tokenizer, spec.data, completion=warmup)
        eval_prompts = (
            load_prompts(spec.data.eval, ctx.tokenizer, spec.data) if spec.data.eval else None
        )
        engine = RolloutEngine(ctx, name, SamplingSettings.of(g), prompts, rewards, eval_prompts)
    source = RolloutSource(ctx, engine, parts.advantage(g.advantage))
    ctx.log(
        f"{spec.algorithm}: {len(prompts)} prompts, {spec.training.batch_size} per step x "
        f"G={g.num_generations}, up to {g.max_new_tokens} new tokens, rewards: "
        + (", ".join(f"{r.name} (x{r.weight:g})" for r in rewards) or "the environment's")
        + (f"; {g.sft_warmup_steps} SFT warm-up steps first" if warmup else "")
    )
    ctx.log(  # the settings as they run, so a run says what it does
        f"{spec.algorithm}: beta {g.beta:g}, epsilon {g.epsilon:g} / {g.clip_high:g}, "
        f"advantage {g.advantage}, loss {g.loss_aggregation}, dynamic sampling "
        + (f"on (up to {g.max_sampling_rounds} rounds)" if g.dynamic_sampling else "off")
        + f", overlong {g.overlong.mode}"
        + (f" (buffer {g.overlong.buffer})" if g.overlong.mode == "penalty" else "")
    )
    return Algorithm(
        source=source,
        finish=rl_finish(
            ctx, source.evaluate if eval_prompts else None, lambda: source.eval_before
        ),
        evaluate=(lambda: {"eval_reward": source.evaluate(ctx.model())}) if eval_prompts else None,
    )


def _multiturn(ctx: Context, name: str, rewards: list[rw.Reward], warmup: bool) -> Any:
    """(rows, eval rows, MultiTurnEngine) for a job with ``environment``."""
    from posttrain.trainer.algorithms import multiturn as mt

    spec, g = ctx.spec, ctx.spec.settings
    rows = mt.load_episode_rows(spec.data.train, spec.data, completion=warmup)
    eval_rows = mt.load_episode_rows(spec.data.eval, spec.data) if spec.data.eval else None
    engine = mt.MultiTurnEngine(
        ctx, name, SamplingSettings.of(g), g.environment, rows, rewards, eval_rows
    )
    env = g.environment
    tools = sorted(engine.tools.tools) if engine.tools else []
    ctx.log(
        f"{spec.algorithm}: environment {env.class_}, up to {env.max_turns} turns of "
        f"{g.max_new_tokens} tokens (+ {env.max_observation_tokens} for each observation), "
        f"tools: {', '.join(tools) or 'none'}; samples in {mt.SAMPLES_FILE}"
    )
    return rows, eval_rows, engine


def _reward_model_factory(ctx: Context) -> Any:
    """``rewardModel`` items: loaded on the trainer's mesh in the compute dtype, frozen."""

    def build(spec: Any, where: str) -> Any:
        import jax.numpy as jnp

        from posttrain.trainer.reward_model_reward import RewardModelReward

        mesh = getattr(getattr(ctx.weights, "run", None), "mesh", None)
        dtype = jnp.dtype(ctx.spec.model.dtype)
        return RewardModelReward(spec.reward_model, where, mesh=mesh, dtype=dtype)

    return build


declare, build = family("grpo")
