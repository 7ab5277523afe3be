"""GRPO and GSPO-token on the shared loop: rollouts with the KV-cache sampler, rewards, advantages.

Each group of `numIterations` (mu) optimizer steps shares one batch of rollouts:

1. take `training.batchSize` prompts (a seeded order, a pure function of the group index);
2. sample `numGenerations` (G) completions per prompt with the current policy (temperature, top-p,
   top-k, `maxNewTokens`, stop at EOS); the sampler's seed is derived from (training.seed, group),
   so a resumed run samples exactly what an uninterrupted one would;
3. score them (`posttrain.trainer.rewards`), normalise advantages within each prompt's group;
4. old log-probs: recomputed with the *training* forward pass (`ctx.policy_logprobs`), not taken
   from the sampler, whose cached, sampling-time numerics would bias the ratio. With mu = 1 the
   ratio's denominator is the current forward itself (stop-gradient), which is the same number
   without a second pass. Reference log-probs (`ctx.reference_logprobs`: the initial weights, or
   with LoRA the base with adapters off) only when beta > 0;
5. mu optimizer steps on that batch with `grpo_loss` or `gspo_token_loss`.

Per-step metrics that come from the rollouts (rewards, lengths, generation speed) ride in the
batch as per-row columns named `metric/...`; the loss returns their means, so the loop logs them
like any other metric.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.api.v1alpha1 import DataSpec, GrpoSpec
from posttrain.trainer import rewards as rw
from posttrain.trainer import storage
from posttrain.trainer.algorithms import grpo_loss as gl
from posttrain.trainer.algorithms.base import Algorithm, Batch, Context, logprobs_from_logits
from posttrain.trainer.data.readers import BadRow, read_rows
from posttrain.trainer.data.text import keep_last, prepend_bos

METRIC = "metric/"


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    text: str  # what reward functions see as the prompt
    ids: tuple[int, ...]  # its tokens, one [bos] first when the tokenizer has one
    columns: Mapping[str, Any]  # the row's other columns, passed to reward functions
    completion: tuple[int, ...] = ()  # data.completionField's tokens + EOS (SFT warm-up only)


def encode_prompt(
    row: Mapping[str, Any], where: str, tokenizer: Any, data: DataSpec, *, completion: bool = False
) -> Prompt:
    """A string prompt is used as written (like SFT's prompt/completion rows); a list of chat
    messages goes through the tokenizer's chat template with the generation prompt added.
    With `completion`, the row's data.completionField is tokenised too (for the SFT warm-up)."""
    if data.prompt_field not in row:
        raise BadRow(
            where,
            f"missing prompt field {data.prompt_field!r} (spec.data.promptField; row has: "
            f"{', '.join(sorted(row)) or 'nothing'})",
        )
    value = row[data.prompt_field]
    if isinstance(value, list):
        text = tokenizer.apply_chat_template(value, add_generation_prompt=True)
    elif isinstance(value, str) and value:
        text = value
    else:
        raise BadRow(
            where, f"prompt field {data.prompt_field!r} must be a non-empty string or messages"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    # One BOS (not a second after a template's), kept when the prompt is cut from the left.
    ids = keep_last(prepend_bos(tokenizer.encode(text), bos), data.max_prompt_length, bos)
    columns = {k: v for k, v in row.items() if k != data.prompt_field}
    target: tuple[int, ...] = ()
    if completion:
        value = row.get(data.completion_field)
        if not isinstance(value, str) or not value:
            raise BadRow(
                where,
                f"spec.grpo.sftWarmupSteps needs a non-empty string in completion field "
                f"{data.completion_field!r} (spec.data.completionField)",
            )
        target = (*tokenizer.encode(value), tokenizer.eos_token_id)
    return Prompt(text=text, ids=tuple(ids), columns=columns, completion=target)


def load_prompts(
    path: str, tokenizer: Any, data: DataSpec, *, completion: bool = False
) -> list[Prompt]:
    prompts: list[Prompt] = []
    for row in read_rows(path, data.format):
        try:
            if isinstance(row.value, BadRow):
                raise row.value
            prompts.append(
                encode_prompt(row.value, row.where, tokenizer, data, completion=completion)
            )
        except BadRow:
            if not data.skip_bad_rows:
                raise
    if not prompts:
        raise ValueError(f"spec.data: {path}: no usable prompts")
    # Every row must carry the same columns: reward functions get them as aligned lists.
    keys = set(prompts[0].columns)
    for p in prompts:
        if set(p.columns) != keys:
            raise ValueError(
                f"spec.data: {path}: rows have different columns ({sorted(keys)} vs "
                f"{sorted(p.columns)}); reward functions need the same columns in every row"
            )
    return prompts


def prompt_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def group_seed(seed: int, group: int) -> int:
    """The sampler's seed for rollout group `group`: a pure function, so resume resamples alike."""
    return int(np.random.SeedSequence([seed, group]).generate_state(1)[0] & 0x7FFFFFFF)


# --------------------------------------------------------------------------- batches (pure)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def rollout_arrays(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids_rn: np.ndarray,
    completion_mask_rn: np.ndarray,
    prompt_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """[prompt left-padded to P | completion right-padded to N] rows for the training forward.

    targets[t] = tokens[t + 1]; completion_mask marks the positions whose target is a completion
    token (EOS included, so the model learns to stop), i.e. positions P-1 .. P+n-2.
    """
    R, N = completion_ids_rn.shape
    L = prompt_len + N
    input_ids = np.full((R, L), pad_id, np.int32)
    attention_mask = np.zeros((R, L), np.int32)
    for r, ids in enumerate(prompt_ids):
        input_ids[r, prompt_len - len(ids) : prompt_len] = ids
        attention_mask[r, prompt_len - len(ids) : prompt_len] = 1
    keep = completion_mask_rn.astype(bool)
    input_ids[:, prompt_len:] = np.where(keep, completion_ids_rn, pad_id)
    attention_mask[:, prompt_len:] = keep
    targets = np.full((R, L), pad_id, np.int32)
    targets[:, :-1] = input_ids[:, 1:]
    completion_mask = np.zeros((R, L), np.float32)
    completion_mask[:, prompt_len - 1 : L - 1] = keep
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "completion_mask": completion_mask,
    }


def cut_at_eos(tokens_rn: np.ndarray, valid_rn: np.ndarray, eos_id: int) -> np.ndarray:
    """Mask of the tokens up to and including the first EOS (the sampler may run past it)."""
    valid = valid_rn.astype(bool)
    is_eos = (tokens_rn == eos_id) & valid
    after_eos = np.cumsum(is_eos, axis=1) - is_eos  # EOSes strictly before each position
    return (valid & (after_eos == 0)).astype(np.float32)


# --------------------------------------------------------------------------- the sampler


def sample(
    model: Any,
    prompt_ids_rp: np.ndarray,
    prompt_mask_rp: np.ndarray,
    g: GrpoSpec,
    eos_id: int,
    pad_id: int,
    seed: int,
    *,
    greedy: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Completions [R, N] and their mask (generated tokens up to the first EOS, inclusive)."""
    from posttrain.trainer.sampling import generate

    out = generate(
        model,
        prompt_ids_rp,
        g.max_new_tokens,
        temperature=0.0 if greedy else g.temperature,
        top_k=None if greedy else g.top_k,
        top_p=None if greedy or g.top_p >= 1.0 else g.top_p,
        eos_id=eos_id,
        seed=seed,
        prompt_mask=prompt_mask_rp,
        pad_id=pad_id,
    )
    tokens = to_host(out.tokens)
    return tokens, cut_at_eos(tokens, to_host(out.mask), eos_id)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when it is sharded over several processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --------------------------------------------------------------------------- the batch source


class RolloutSource:
    """One batch of rollouts per group of mu steps; the same batch for each step of the group.

    The first `sftWarmupSteps` steps instead get teacher-forced batches of the data's completions
    (same array layout, flagged by the `sft` column), so one jitted step serves both phases.
    """

    def __init__(
        self,
        ctx: Context,
        prompts: list[Prompt],
        rewards: list[rw.Reward],
        eval_prompts: list[Prompt] | None = None,
    ):
        spec = ctx.spec
        self.ctx = ctx
        self.g: GrpoSpec = spec.grpo
        self.prompts = prompts
        self.eval_prompts = eval_prompts
        self.rewards = rewards
        self.warmup = self.g.sft_warmup_steps
        self.batch_prompts = spec.training.batch_size
        self.seed = spec.training.seed
        self.shuffle = spec.data.shuffle
        tok = ctx.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # One prompt width for the whole run, so the jitted sampler and step compile once
        # (rounded up for friendlier shapes, never past maxPromptLength).
        longest = max(len(p.ids) for p in [*prompts, *(eval_prompts or [])])
        self.prompt_len = min(round_up(longest, 8), max(longest, spec.data.max_prompt_length))
        self.seq_len = self.prompt_len + self.g.max_new_tokens
        if self.seq_len > spec.data.max_length:
            raise ValueError(
                f"spec.grpo.maxNewTokens: {self.g.max_new_tokens} new tokens after prompts of up to "
                f"{self.prompt_len} tokens exceed spec.data.maxLength ({spec.data.max_length}); "
                "lower maxNewTokens or maxPromptLength, or raise maxLength"
            )
        self._orders: dict[int, np.ndarray] = {}
        self._group = -1
        self._batch: dict[str, np.ndarray] | None = None
        self._handed_out: float | None = None
        self._last_tokens = 0.0
        self.eval_before: float | None = None  # greedy reward on data.eval when RL starts

    # Prompt k of the run (k counts over epochs) is a pure function of k and the seed.
    def _prompt(self, k: int) -> Prompt:
        epoch, i = divmod(k, len(self.prompts))
        if epoch not in self._orders:
            self._orders = {epoch: prompt_order(len(self.prompts), self.seed, epoch, self.shuffle)}
        return self.prompts[int(self._orders[epoch][i])]

    def next_batch(self, step: int) -> Batch:
        now = time.perf_counter()
        # The loop does not time its step for us: the time from handing out the previous batch
        # to this call is that step's training time (with logging), so the figure lags one step.
        train_seconds = now - self._handed_out if self._handed_out is not None else None
        if step < self.warmup:
            batch = self._warmup_batch(step)
        else:
            if step == self.warmup and self.eval_prompts and self.eval_before is None:
                self.eval_before = self.evaluate(self.ctx.model())
                self.ctx.log(f"greedy reward on data.eval before RL: {self.eval_before:.4f}")
            group = (step - self.warmup) // self.g.num_iterations
            if group != self._group or self._batch is None:
                self._batch = self._rollouts(group)
                self._group = group
            batch = dict(self._batch)
        rows = len(batch["advantages"])
        speed = self._last_tokens / train_seconds if train_seconds else 0.0
        batch[METRIC + "train_tokens_per_second"] = np.full(rows, speed, np.float32)
        self._last_tokens = float(batch["attention_mask"].sum())
        self._handed_out = time.perf_counter()
        return batch

    def _prompt_block(self, rows: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded [R, P] prompt ids and mask."""
        P = self.prompt_len
        prompt_ids = np.full((len(rows), P), self.pad_id, np.int32)
        prompt_mask = np.zeros((len(rows), P), np.int32)
        for r, p in enumerate(rows):
            prompt_ids[r, P - len(p.ids) :] = p.ids
            prompt_mask[r, P - len(p.ids) :] = 1
        return prompt_ids, prompt_mask

    def _generate(
        self, model: Any, rows: Sequence[Prompt], seed: int, greedy: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        prompt_ids, prompt_mask = self._prompt_block(rows)
        tokens, mask = sample(
            model, prompt_ids, prompt_mask, self.g, self.eos_id, self.pad_id, seed, greedy=greedy
        )
        lengths = mask.sum(axis=1).astype(int)
        texts = [
            self.ctx.tokenizer.decode(tokens[r, : lengths[r]].tolist()) for r in range(len(rows))
        ]
        return tokens, mask, texts

    def _score(self, rows: Sequence[Prompt], completions: list[str]):
        columns = {k: [p.columns[k] for p in rows] for k in rows[0].columns}
        return rw.score(self.rewards, [p.text for p in rows], completions, columns)

    def evaluate(self, model: Any) -> float:
        """Mean total reward of greedy completions to every data.eval prompt."""
        assert self.eval_prompts
        R = self.batch_prompts * self.g.num_generations  # the rollout shape: compiled already
        totals: list[float] = []
        for start in range(0, len(self.eval_prompts), R):
            chunk = self.eval_prompts[start : start + R]
            padded = chunk + [chunk[-1]] * (R - len(chunk))
            _, _, texts = self._generate(model, padded, seed=0, greedy=True)
            total, _ = self._score(chunk, texts[: len(chunk)])
            totals.extend(total.tolist())
        return float(np.mean(totals))

    def _warmup_batch(self, step: int) -> dict[str, np.ndarray]:
        """Teacher-forced rows: prompt + the data's completion (+ EOS), cut to maxNewTokens."""
        R = self.batch_prompts * self.g.num_generations
        rows = [self._prompt(step * R + r) for r in range(R)]
        N = self.g.max_new_tokens
        completion = np.full((R, N), self.pad_id, np.int32)
        mask = np.zeros((R, N), np.float32)
        for r, p in enumerate(rows):
            target = p.completion[:N]
            completion[r, : len(target)] = target
            mask[r, : len(target)] = 1
        batch = rollout_arrays(
            [p.ids for p in rows], completion, mask, self.prompt_len, self.pad_id
        )
        return self._finish_batch(batch, np.zeros(R, np.float32), sft=True)

    def _finish_batch(
        self, batch: dict[str, np.ndarray], adv: np.ndarray, *, sft: bool
    ) -> dict[str, np.ndarray]:
        """The columns every batch has (fixed keys, so the step compiles once)."""
        R = len(adv)
        batch["advantages"] = adv.astype(np.float32)
        # token-mean's denominator per row, so micro-batches average to the whole batch's mean.
        batch["tokens_per_row"] = np.full(R, batch["completion_mask"].sum() / R, np.float32)
        if self.warmup:
            batch["sft"] = np.full(R, float(sft), np.float32)
        if self.g.num_iterations > 1:
            batch["old_logp"] = (
                np.zeros_like(batch["completion_mask"])  # unused: the loss takes the SFT branch
                if sft
                else self._policy_logprobs(batch)
            )
        if self.g.beta > 0:  # never with a warm-up (the API refuses beta > 0 there)
            batch["ref_logp"] = self._reference_logprobs(batch)
        if sft:  # rollout metrics do not exist yet: logged as null
            for name in self._metric_names():
                batch[METRIC + name] = np.full(R, np.nan, np.float32)
        return batch

    # build() refuses a job whose hooks are missing; these say so too for a source built directly.
    def _policy_logprobs(self, batch: Batch) -> np.ndarray:
        hook = self.ctx.policy_logprobs
        if hook is None:
            raise ValueError("spec.grpo.numIterations > 1 needs the loop's policy_logprobs hook")
        return hook(batch, temperature=self.g.temperature).astype(np.float32)

    def _reference_logprobs(self, batch: Batch) -> np.ndarray:
        hook = self.ctx.reference_logprobs
        if hook is None:
            raise ValueError("spec.grpo.beta > 0 needs the loop's reference_logprobs hook")
        return hook(batch, temperature=self.g.temperature).astype(np.float32)

    def _metric_names(self) -> list[str]:
        return [
            "reward_mean",
            "reward_std",
            *(f"reward/{r.name}" for r in self.rewards),
            "completion_length",
            "groups_with_equal_rewards",
            "generation_tokens_per_second",
        ]

    def _rollouts(self, group: int) -> dict[str, np.ndarray]:
        G = self.g.num_generations
        chosen = [self._prompt(group * self.batch_prompts + j) for j in range(self.batch_prompts)]
        rows = [p for p in chosen for _ in range(G)]  # each prompt's G completions adjacent
        started = time.perf_counter()
        tokens, mask, completions = self._generate(
            self.ctx.model(), rows, group_seed(self.seed, group)
        )
        gen_seconds = time.perf_counter() - started
        lengths = mask.sum(axis=1)
        total, each = self._score(rows, completions)
        adv = np.asarray(gl.group_advantages(jnp.asarray(total, jnp.float32), G, self.g.advantage))
        batch = rollout_arrays([p.ids for p in rows], tokens, mask, self.prompt_len, self.pad_id)
        batch = self._finish_batch(batch, adv, sft=False)

        R = len(rows)
        constant = lambda v: np.full(R, v, np.float32)  # noqa: E731
        by_group = total.reshape(-1, G)
        batch[METRIC + "reward_mean"] = total.astype(np.float32)
        batch[METRIC + "reward_std"] = constant(total.std())
        for name, values in each.items():
            batch[f"{METRIC}reward/{name}"] = values.astype(np.float32)
        batch[METRIC + "completion_length"] = lengths.astype(np.float32)
        batch[METRIC + "groups_with_equal_rewards"] = constant(np.mean(by_group.std(axis=1) == 0))
        batch[METRIC + "generation_tokens_per_second"] = constant(
            lengths.sum() / max(gen_seconds, 1e-9)
        )
        return batch

    def state(self) -> dict[str, Any]:
        # Mid-group (mu > 1) the batch was sampled by weights that have since changed: keep it, so
        # a resumed run trains on exactly the same rollouts. At mu = 1 nothing needs saving: the
        # group index is the step, and prompts and seed follow from it.
        state: dict[str, Any] = {"group": self._group, "eval_before": self.eval_before}
        if self.g.num_iterations > 1 and self._batch is not None:
            state["batch"] = {k: _encode(v) for k, v in self._batch.items()}
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        self._group = int(state.get("group", -1))
        self.eval_before = state.get("eval_before")
        saved = state.get("batch")
        self._batch = None if saved is None else {k: _decode(v) for k, v in saved.items()}


def _encode(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.ravel().tolist()}


def _decode(d: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(d["data"], dtype=d["dtype"]).reshape(d["shape"])


# --------------------------------------------------------------------------- the loss


def make_loss(g: GrpoSpec, algorithm: str):
    objective = gl.gspo_token_loss if algorithm == "gspo-token" else gl.grpo_loss
    eps, eps_high = g.clip_range(algorithm)

    def loss(model, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits_btv = model(batch["input_ids"], batch["attention_mask"])
        # One forward for both log-probs and entropy: the shared log-prob maths on these logits.
        # At the sampling temperature: the ratio and the KL must see the policy that sampled.
        logp_bt = logprobs_from_logits(logits_btv, batch["targets"], temperature=g.temperature)
        mask_bt = batch["completion_mask"]
        rows = mask_bt.shape[0]
        num_tokens = batch["tokens_per_row"].mean() * rows
        # SFT warm-up rows (flag `sft`) have no rollout: their old log-probs are the current ones.
        sft = batch["sft"].mean() > 0 if "sft" in batch else None
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
            aggregation=g.loss_aggregation,
            num_tokens=num_tokens,
        )
        if sft is not None:
            plain_bt = logprobs_from_logits(logits_btv, batch["targets"])  # SFT: temperature 1
            nll = gl.aggregate(-plain_bt, mask_bt, "token-mean", num_tokens)
            value = jnp.where(sft, nll, value)
            metrics = {k: jnp.where(sft, jnp.nan, v) for k, v in metrics.items()}
            metrics["sft_loss"] = jnp.where(sft, jax.lax.stop_gradient(nll), jnp.nan)
        entropy_bt = gl.entropy_from_logits(logits_btv)
        metrics["entropy"] = (entropy_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)
        for key, column in batch.items():
            if key.startswith(METRIC):
                metrics[key.removeprefix(METRIC)] = column.mean()
        return value, metrics

    return loss


# --------------------------------------------------------------------------- the final report


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def reward_summary(history: Sequence[Mapping[str, Any]], window: int = 10) -> dict[str, float]:
    """reward_mean averaged over the first and last `window` logged steps, and the rise."""
    values = [float(m["reward_mean"]) for m in history if m.get("reward_mean") is not None]
    if not values:
        return {}
    w = max(1, min(window, len(values) // 2 or 1))
    first, last = float(np.mean(values[:w])), float(np.mean(values[-w:]))
    return {"reward_first": first, "reward_last": last, "reward_rise": last - first}


def plot_rewards(history: Sequence[Mapping[str, Any]], path: str) -> str | None:
    """A PNG of reward_mean (and each reward term) over steps; None when nothing was logged."""
    rows = [m for m in history if m.get("reward_mean") is not None and "step" in m]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["reward_mean"] for m in rows], label="reward_mean", linewidth=2)
    terms = sorted({k for m in rows for k in m if k.startswith("reward/")})
    for key in terms if len(terms) > 1 else []:  # one term is the total again
        values = [np.nan if m.get(key) is None else m[key] for m in rows]
        ax.plot(steps, values, label=key, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path


# --------------------------------------------------------------------------- build


def build(ctx: Context) -> Algorithm:
    spec = ctx.spec
    g = spec.grpo
    if g is None:  # the API refuses this already; keep the message if it is ever bypassed
        raise ValueError(f"spec.grpo: algorithm {spec.algorithm} needs spec.grpo")
    if g.num_iterations > 1 and ctx.policy_logprobs is None:
        raise ValueError("spec.grpo.numIterations > 1 needs the loop's policy_logprobs hook")
    if g.beta > 0 and ctx.reference_logprobs is None:
        raise ValueError("spec.grpo.beta > 0 needs the loop's reference_logprobs hook")
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
    source = RolloutSource(ctx, prompts, rewards, eval_prompts)
    ctx.log(
        f"{spec.algorithm}: {len(prompts)} prompts, {spec.training.batch_size} per step x "
        f"G={g.num_generations}, up to {g.max_new_tokens} new tokens, rewards: "
        + ", ".join(f"{r.name} (x{r.weight:g})" for r in rewards)
        + (f"; {g.sft_warmup_steps} SFT warm-up steps first" if warmup else "")
    )

    def finish(model: Any) -> dict[str, float]:
        # Only rank 0 writes metrics.jsonl; other hosts may not see it (local disks).
        history = read_metrics(storage.join(ctx.output_dir, "metrics.jsonl")) if ctx.rank0 else []
        summary = reward_summary(history)
        if eval_prompts:
            if source.eval_before is not None:
                summary["eval_reward_before"] = source.eval_before
            summary["eval_reward_after"] = source.evaluate(model)
        if ctx.rank0:
            plotted = plot_rewards(history, storage.join(ctx.output_dir, "reward.png"))
            if plotted:
                ctx.log(f"reward plot: {plotted}")
        return summary

    return Algorithm(
        name=spec.algorithm,
        loss=make_loss(g, spec.algorithm),
        source=source,
        finish=finish,
    )
