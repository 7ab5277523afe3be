"""The rollout engine shared by GRPO, GSPO-token and PPO: sample completions, score them.

Pure helpers build the training rows ([prompt left-padded to P | completion right-padded to N])
and cut completions at EOS; ``RolloutEngine`` fixes one prompt width for the whole run (so the
jitted sampler and step compile once), samples with the KV-cache sampler, decodes and scores the
completions with the job's rewards, and evaluates greedy reward on held-out prompts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from posttrain.trainer import rewards as rw
from posttrain.trainer.data.prompts import Prompt, PromptStream
from posttrain.trainer.data.text import pad_id_of


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


def cut_at_eos(
    tokens_rn: np.ndarray, valid_rn: np.ndarray, eos_id: int | Sequence[int]
) -> np.ndarray:
    """Mask of the tokens up to and including the first EOS, any of ``eos_id`` (an id or
    several: every EOS id of the model's generation config); the sampler may run past it."""
    valid = valid_rn.astype(bool)
    is_eos = np.isin(tokens_rn, np.atleast_1d(np.asarray(eos_id))) & valid
    after_eos = np.cumsum(is_eos, axis=1) - is_eos  # EOSes strictly before each position
    return (valid & (after_eos == 0)).astype(np.float32)


# --------------------------------------------------------------------------- the sampler


def sample(
    model: Any,
    prompt_ids_rp: np.ndarray,
    prompt_mask_rp: np.ndarray,
    g: SamplingSettings,
    eos_id: int | Sequence[int],
    pad_id: int,
    seed: int,
    *,
    greedy: bool = False,
    chunk_rows: int | None = None,
    prompt_group: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completions [R, N], their mask (generated tokens up to the first EOS, inclusive) and the
    sampler's log-probs of them (``sampling_logprobs``: the distribution each was drawn from)."""
    from posttrain.trainer.sampling import generate

    out = generate(
        model,
        prompt_ids_rp,
        g.max_new_tokens,
        temperature=0.0 if greedy else g.temperature,
        top_k=None if greedy else g.top_k,
        top_p=None if greedy or g.top_p >= 1.0 else g.top_p,
        eos_id=list(np.atleast_1d(eos_id)),
        seed=seed,
        prompt_mask=prompt_mask_rp,
        pad_id=pad_id,
        chunk_rows=chunk_rows,
        prompt_group=prompt_group,
    )
    tokens = to_host(out.tokens)
    mask = cut_at_eos(tokens, to_host(out.mask), eos_id)
    return tokens, mask, to_host(out.sampling_logprobs) * mask


def completion_column(values_rn: np.ndarray, prompt_len: int) -> np.ndarray:
    """[R, N] per completion token -> [R, P + N] at the positions that predict them (P-1 ..
    P+N-2, as ``rollout_arrays``' completion_mask), 0 elsewhere."""
    R, N = values_rn.shape
    out = np.zeros((R, prompt_len + N), np.float32)
    out[:, prompt_len - 1 : prompt_len + N - 1] = values_rn
    return out


def score_sharded(
    rewards: Sequence[rw.Reward],
    prompts: list[str],
    completions: list[str],
    columns: Mapping[str, list[Any]],
    process_index: int,
    process_count: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``rewards.score`` with each completion scored once across processes: process i scores
    rows [i s, (i + 1) s) with s = ceil(R / processes), the totals and terms are all-gathered
    (``multihost_utils.process_allgather``), so every process ends with the whole batch's."""
    from jax.experimental import multihost_utils

    n = len(completions)
    share = -(-n // process_count)
    lo, hi = min(process_index * share, n), min((process_index + 1) * share, n)
    names = [r.name for r in rewards]
    mine = np.zeros((1 + len(names), share), np.float64)
    if hi > lo:
        total, each = rw.score(
            rewards,
            prompts[lo:hi],
            completions[lo:hi],
            {k: v[lo:hi] for k, v in columns.items()},
        )
        mine[0, : hi - lo] = total
        for j, name in enumerate(names):
            mine[1 + j, : hi - lo] = each[name]
    # float64 travels as float32 unless x64 is on: send the bits as two uint32 words each.
    words = mine.view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words))  # [processes, terms, 2 share]
    values = np.ascontiguousarray(gathered).view(np.float64)  # [processes, terms, share]
    values = values.transpose(1, 0, 2).reshape(1 + len(names), process_count * share)[:, :n]
    return values[0].copy(), {name: values[1 + j].copy() for j, name in enumerate(names)}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when it is sharded over several processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclass(frozen=True)
class SamplingSettings:
    """How rollouts are sampled (spec.grpo / spec.ppo share these names)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    chunk_rows: int | None = None  # generationBatchSize: rows the sampler holds at a time
    # numGenerations: a rollout's rows are runs of this many samples of one prompt, which the
    # sampler prefills once (``sampling.generate``'s prompt_group)
    prompt_group: int = 1

    @classmethod
    def of(cls, block: Any) -> SamplingSettings:
        return cls(
            max_new_tokens=block.max_new_tokens,
            temperature=block.temperature,
            top_p=block.top_p,
            top_k=getattr(block, "top_k", None),
            chunk_rows=getattr(block, "generation_batch_size", None),
            prompt_group=getattr(block, "num_generations", 1),
        )


@dataclass
class Rollout:
    """One batch of sampled completions, scored: training rows plus what the metrics need."""

    # rollout_arrays(): input_ids, attention_mask, targets, completion_mask; and sampler_logp,
    # the sampler's log-prob of each completion token at its target position (0 elsewhere)
    arrays: dict[str, np.ndarray]
    rewards: np.ndarray  # [R] total reward
    reward_terms: dict[str, np.ndarray]  # name -> [R]
    lengths: np.ndarray  # [R] completion tokens (EOS included)
    seconds: float  # generation time
    texts: list[str] | None = None  # the decoded completions (for the completion log)


class RolloutEngine:
    """Prompts -> sampled, scored completions, with one prompt width for the whole run."""

    def __init__(
        self,
        ctx: Any,
        block_field: str,
        settings: SamplingSettings,
        prompts: list[Prompt],
        rewards: list[rw.Reward],
        eval_prompts: list[Prompt] | None = None,
    ):
        spec = ctx.spec
        self.ctx = ctx
        self.block = block_field
        self.settings = settings
        self.prompts = prompts
        self.eval_prompts = eval_prompts
        self.rewards = rewards
        self.stream = PromptStream(prompts, spec.training.seed, spec.data.shuffle)
        tok = ctx.tokenizer
        from posttrain.trainer.sampling import stop_token_ids

        # Every EOS id: the model's generation config's (Llama 3 instruct ends turns with
        # 128009 / 128008) and the tokenizer's; completions stop and are cut at any of them.
        config = getattr(ctx, "config", None)
        self.eos_ids = stop_token_ids(getattr(config, "eos_token_ids", None), tok.eos_token_id)
        self.eos_id = self.eos_ids[0] if self.eos_ids else tok.eos_token_id
        self.pad_id = pad_id_of(tok)
        # One prompt width for the whole run (rounded up for friendlier shapes, never past
        # maxPromptLength), so the jitted sampler and step compile once.
        longest = max(len(p.ids) for p in [*prompts, *(eval_prompts or [])])
        self.prompt_len = min(round_up(longest, 8), max(longest, spec.data.max_prompt_length))
        self.seq_len = self.prompt_len + settings.max_new_tokens
        if self.seq_len > spec.data.max_length:
            raise ValueError(
                f"spec.{block_field}.maxNewTokens: {settings.max_new_tokens} new tokens after "
                f"prompts of up to {self.prompt_len} tokens exceed spec.data.maxLength "
                f"({spec.data.max_length}); lower maxNewTokens or maxPromptLength, or raise maxLength"
            )

    def prompt(self, k: int) -> Prompt:
        return self.stream[k]

    def prompt_block(self, rows: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded [R, P] prompt ids and mask."""
        P = self.prompt_len
        prompt_ids = np.full((len(rows), P), self.pad_id, np.int32)
        prompt_mask = np.zeros((len(rows), P), np.int32)
        for r, p in enumerate(rows):
            prompt_ids[r, P - len(p.ids) :] = p.ids
            prompt_mask[r, P - len(p.ids) :] = 1
        return prompt_ids, prompt_mask

    def generate(
        self,
        model: Any,
        rows: Sequence[Prompt],
        seed: int,
        greedy: bool = False,
        prompt_group: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """Completions [R, N], their mask, their decoded texts and the sampler's log-probs.
        ``prompt_group``: the rows are runs of that many copies of one prompt."""
        prompt_ids, prompt_mask = self.prompt_block(rows)
        try:
            tokens, mask, logps = sample(
                model,
                prompt_ids,
                prompt_mask,
                self.settings,
                self.eos_ids,
                self.pad_id,
                seed,
                greedy=greedy,
                chunk_rows=self.settings.chunk_rows,
                prompt_group=prompt_group,
            )
        except ValueError as err:
            if not str(err).startswith("chunk_rows"):
                raise
            raise ValueError(f"spec.{self.block}.generationBatchSize: {err}") from None
        lengths = mask.sum(axis=1).astype(int)
        texts = [
            self.ctx.tokenizer.decode(tokens[r, : lengths[r]].tolist()) for r in range(len(rows))
        ]
        return tokens, mask, texts, logps

    def score(
        self, rows: Sequence[Prompt], completions: list[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The rewards of every completion, each scored once: with several processes each scores
        its share of the rows and the results are gathered (``score_sharded``)."""
        columns = {k: [p.columns[k] for p in rows] for k in rows[0].columns}
        prompts = [p.text for p in rows]
        count = getattr(self.ctx, "process_count", 1)
        if count <= 1:
            return rw.score(self.rewards, prompts, completions, columns)
        return score_sharded(
            self.rewards, prompts, completions, columns, self.ctx.process_index, count
        )

    def rollout(self, model: Any, rows: Sequence[Prompt], seed: int) -> Rollout:
        started = time.perf_counter()
        tokens, mask, completions, logps = self.generate(
            model, rows, seed, prompt_group=self.settings.prompt_group
        )
        seconds = time.perf_counter() - started
        total, each = self.score(rows, completions)
        self.last = ([p.text for p in rows], completions, total)  # for the completion log
        arrays = rollout_arrays([p.ids for p in rows], tokens, mask, self.prompt_len, self.pad_id)
        arrays["sampler_logp"] = completion_column(logps, self.prompt_len)
        return Rollout(arrays, total, each, mask.sum(axis=1), seconds, completions)

    def teacher_forced(self, first: int, rows: int) -> dict[str, np.ndarray]:
        """SFT warm-up rows: prompts ``first .. first + rows - 1`` of the run followed by the data's
        completion (+ EOS), cut to maxNewTokens, in the rollout layout (one step serves both)."""
        prompts = [self.prompt(first + r) for r in range(rows)]
        N = self.settings.max_new_tokens
        completion = np.full((rows, N), self.pad_id, np.int32)
        mask = np.zeros((rows, N), np.float32)
        for r, p in enumerate(prompts):
            target = p.completion[:N]
            completion[r, : len(target)] = target
            mask[r, : len(target)] = 1
        arrays = rollout_arrays(
            [p.ids for p in prompts], completion, mask, self.prompt_len, self.pad_id
        )
        arrays["sampler_logp"] = np.zeros_like(arrays["completion_mask"])  # no sampler here
        return arrays

    def evaluate(self, model: Any, width: int) -> float:
        """Mean total reward of greedy completions to every data.eval prompt, ``width`` rows at a
        time (the rollout batch's row count, so the sampler is compiled already)."""
        assert self.eval_prompts
        totals: list[float] = []
        for start in range(0, len(self.eval_prompts), width):
            chunk = self.eval_prompts[start : start + width]
            padded = chunk + [chunk[-1]] * (width - len(chunk))
            _, _, texts, _ = self.generate(model, padded, seed=0, greedy=True)
            total, _ = self.score(chunk, texts[: len(chunk)])
            totals.extend(total.tolist())
        return float(np.mean(totals))

    def metric_names(self) -> list[str]:
        return [
            "reward_mean",
            "reward_std",
            *(f"reward/{r.name}" for r in self.rewards),
            "completion_length",
        ]


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A host array as JSON (a batch source's state before rollout batches went to orbax)."""
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.ravel().tolist()}


def decode_array(d: Any) -> np.ndarray:
    return np.asarray(d["data"], dtype=d["dtype"]).reshape(d["shape"])


# --------------------------------------------------------------------------- the shared source


METRIC = "metric/"  # per-row columns the loss averages into metrics


def mini_batch_order(rows: int, seed: int, rollout: int, epoch: int) -> np.ndarray:
    """The rows of a rollout batch in epoch `epoch`'s order (a fresh permutation per epoch, as TRL
    and verl shuffle); a pure function, so resume continues exactly. PPO and the GRPO family."""
    return np.random.default_rng([seed, rollout, epoch]).permutation(rows)


class RolloutBatchSource:
    """What every rollout algorithm's batch source shares (GRPO's family, PPO).

    The first ``warmup`` steps get teacher-forced SFT batches (``warmup_batch``); at the first RL
    step the greedy reward on data.eval is measured once (``eval_before``); then each rollout
    batch (``make_rollout``, given its index) serves ``steps_per_rollout`` optimizer steps
    (``step_batch`` picks what step k of it trains on). The rollout batch rides in the checkpoint
    while steps of it remain, so a resumed run trains on exactly the same rollouts; its index
    gives the seeds (and, unless the subclass keeps a prompt cursor, the prompts).
    """

    def __init__(self, ctx: Any, engine: RolloutEngine, *, warmup: int, steps_per_rollout: int):
        self.ctx = ctx
        self.engine = engine
        self.warmup = warmup
        self.steps_per_rollout = steps_per_rollout
        self.eval_before: float | None = None  # greedy reward on data.eval when RL starts
        self.log_every = getattr(ctx.spec.settings, "log_completions_every_steps", None)
        # Timings measured on this host, logged by the loop as they are (not batch columns, whose
        # mean over a batch sharded across processes would mix the processes' timers).
        self.host_metrics: dict[str, float] = {}
        self._logged_at: int | None = None
        self._rollout = -1
        self._batch: dict[str, np.ndarray] | None = None
        self.remote: Any = None  # async RL: the trainer's rollout service (trainer/async_rl)

    # what subclasses provide
    def warmup_batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def make_rollout(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def step_batch(self, batch: dict[str, np.ndarray], index: int, k: int) -> dict[str, np.ndarray]:
        return dict(batch)

    def evaluate(self, model: Any) -> float:
        raise NotImplementedError

    @property
    def next_rollout(self) -> int:
        """The rollout batch this source needs next (after a resume: the one after the batch
        the checkpoint holds or last finished)."""
        return self._rollout + 1

    def rollout_request(self, index: int) -> tuple[list[Prompt], int]:
        """The prompt rows (each repeated as the algorithm samples them) and the sampler's seed
        of rollout batch ``index``: a pure function of the index, which is what lets a rollout
        worker sample exactly the batch the trainer would (async RL)."""
        raise NotImplementedError

    def sample(self, index: int, rows: list[Prompt], seed: int) -> Rollout:
        """Rollout batch ``index`` sampled and scored: here with the live policy (sync), or taken
        from the rollout workers (async: ``remote``, a ``trainer/async_rl`` service)."""
        if self.remote is None:
            return self.engine.rollout(self.ctx.model(), rows, seed)
        t = self.remote.take(index, self.warmup + index * self.steps_per_rollout)
        self.engine.last = ([p.text for p in rows], t.texts or [], t.rewards)  # completion log
        self.host_metrics.update(self.remote.stats.metrics())
        self.host_metrics["policy_version_sampled"] = float(t.version)
        self.host_metrics["rollout_index"] = float(index)
        return Rollout(t.arrays, t.rewards, t.reward_terms, t.lengths, t.seconds, t.texts)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, state: Mapping[str, Any]) -> None:
        pass

    # the BatchSource protocol
    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        if step < self.warmup:
            return self.warmup_batch(step)
        if step == self.warmup and self.engine.eval_prompts and self.eval_before is None:
            self.eval_before = self.evaluate(self.ctx.model())
            self.ctx.log(f"greedy reward on data.eval before RL: {self.eval_before:.4f}")
        index, k = divmod(step - self.warmup, self.steps_per_rollout)
        if index != self._rollout or self._batch is None:
            self._batch = self.make_rollout(index)
            self._rollout = index
            self._log_completions(step)
        return self.step_batch(self._batch, index, k)

    def _log_completions(self, step: int, limit: int = 16) -> None:
        """The rollout's first ``limit`` completions (its last sampling round) to
        DIR/samples.jsonl and TensorBoard text, when ``logCompletionsEverySteps`` says so."""
        every, last = self.log_every, getattr(self.engine, "last", None)
        if not every or last is None or not getattr(self.ctx, "rank0", True):
            return
        if self._logged_at is not None and step // every == self._logged_at // every:
            return
        self._logged_at = step
        import json
        import os

        prompts, completions, rewards = last
        rows = [
            {"step": step + 1, "prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in list(zip(prompts, completions, rewards, strict=True))[:limit]
        ]
        os.makedirs(self.ctx.output_dir, exist_ok=True)
        with open(os.path.join(self.ctx.output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # samples.jsonl is enough
            return
        if getattr(self, "_tb", None) is None:
            self._tb = SummaryWriter(os.path.join(self.ctx.output_dir, "tensorboard"))
        table = "| reward | prompt | completion |\n| --- | --- | --- |\n" + "".join(
            f"| {r['reward']:.3f} | {_cell(r['prompt'])} | {_cell(r['completion'])} |\n"
            for r in rows
        )
        self._tb.add_text("completions", table, step + 1)
        self._tb.flush()

    def state(self) -> dict[str, Any]:
        """The position as JSON; the rollout batch itself (while steps of it remain) goes into
        the checkpoint as arrays (``arrays``), its column names here (``batch_columns``)."""
        state: dict[str, Any] = {
            "rollout": self._rollout,
            "eval_before": self.eval_before,
            **self.extra_state(),
        }
        if self._holds_batch():
            assert self._batch is not None
            state["batch_columns"] = list(self._batch)
        return state

    def arrays(self) -> dict[str, np.ndarray]:
        """The held rollout batch as host arrays for the checkpoint (orbax, not JSON), keyed
        ``c0, c1, ...`` in ``state()["batch_columns"]``'s order (column names hold ``/``)."""
        if not self._holds_batch():
            return {}
        assert self._batch is not None
        return {f"c{i}": np.asarray(v) for i, v in enumerate(self._batch.values())}

    def _holds_batch(self) -> bool:
        return self.steps_per_rollout > 1 and self._batch is not None

    def restore(self, state: Mapping[str, Any]) -> None:
        """From ``state()``, with the checkpoint's arrays under ``batch_arrays`` (the loop puts
        them there); a checkpoint written before the arrays moved out of JSON has ``batch``."""
        self._rollout = int(state.get("rollout", state.get("group", -1)))  # "group": before v0.2
        self.eval_before = state.get("eval_before")
        self._batch = restored_batch(state)
        self.restore_extra(state)


def _cell(text: str) -> str:
    """Text for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def restored_batch(state: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The rollout batch a checkpointed ``RolloutBatchSource.state()`` (plus its arrays) holds."""
    names, arrays = state.get("batch_columns"), state.get("batch_arrays")
    if names is not None:
        if arrays is None:
            raise ValueError("the checkpoint names a rollout batch but holds no arrays for it")
        return {name: np.asarray(arrays[f"c{i}"]) for i, name in enumerate(names)}
    saved = state.get("batch")  # JSON lists, as checkpoints before the arrays were written
    return None if saved is None else {k: decode_array(v) for k, v in saved.items()}


def saved_batch(ckpt: Any, step: int) -> dict[str, np.ndarray] | None:
    """The rollout batch held in checkpoint ``step`` of a ``Checkpointer`` (tests, tools)."""
    meta = ckpt.restore_meta(step)
    return restored_batch({**meta["data"], "batch_arrays": ckpt.restore_arrays(step)})
