"""Knowledge distillation from a frozen teacher on SFT-style rows (``spec.distill``).

The teacher is declared on the ``Algorithm`` (``teacher=ModelSpec(...)``): the loop loads it like
``spec.model.base``, frozen, on the same mesh, and the loss runs its forward inside the jitted
step, so teacher logits never leave the device. Data, eval batches and the final exact-match
report are SFT's (``sft.supervised``); distillation covers the completion tokens.

Strategies (the maths is in ``distill_loss.py``), each mixed with the hard-label cross-entropy
as ``alpha * distill_loss + (1 - alpha) * ce_loss``:

- ``logit``: T^2 * KL(teacher || student) of the temperature-softened next-token distributions.
- ``attention``: KL(teacher || student) of each query's attention over the keys, on mapped layer
  pairs; head-averaged maps when the head counts differ. Only those layers compute explicit
  probabilities (the model's ``attention_probs_layers``).
- ``feature``: MSE between the teacher's layer outputs and the student's, projected to the
  teacher's hidden size by a learned float32 linear map per pair (the ``projection`` head: it
  trains in every mode, is checkpointed, and is not exported with the student).

Every term over the vocabulary (the KD term, both cross-entropies) runs from final hidden states a
chunk of tokens at a time (``hidden_forward``, ``chunked_logprobs``, ``chunked_generalized_jsd``):
no [B, T, V] float32 logits. With ``spec.distill.beta`` (or ``onPolicy``) the logit term is GKD's
generalised JSD. With ``onPolicy`` the batch source (``OnPolicy``) lets the student sample the
completions of a share ``lmbda`` of the steps through ``sampling.generate``; the declaration's
``rollout`` tells ``plan`` what that sampling holds.

Layer pairs: ``spec.distill.layers`` or ``default_layer_map``. Metrics: ``distill_loss``,
``ce_loss``, ``teacher_ce_loss`` (the teacher's own cross-entropy on the same tokens: the level
the student approaches) and ``loss``; the same as ``eval_*`` on ``spec.data.eval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain.api.settings.distill import DistillSpec
from posttrain.api.v1alpha1 import ModelSpec
from posttrain.trainer.algorithms import distill_loss as dl
from posttrain.trainer.algorithms.base import (
    Algorithm,
    Context,
    Declaration,
    HeadBuilder,
    LossFn,
    Metrics,
    ModelConfigs,
    Models,
    RolloutShape,
)
from posttrain.trainer.algorithms.rollout import SamplingSettings
from posttrain.trainer.algorithms.sft import columns as sft_columns
from posttrain.trainer.algorithms.sft import sft_loss, supervised
from posttrain.trainer.data import sft as sft_data
from posttrain.trainer.data.sft import Example
from posttrain.trainer.data.text import pad_id_of
from posttrain.trainer.models.logprobs import chunked_logprobs
from posttrain.trainer.models.transformer import LayerTaps
from posttrain.trainer.sampling import generate

BUILTIN = "builtin:"


class Projections(nnx.Module):
    """Student hidden size -> teacher hidden size, one float32 linear map per layer pair."""

    def __init__(self, pairs: int, student_hidden: int, teacher_hidden: int, *, rngs: nnx.Rngs):
        self.maps = nnx.List(
            [
                nnx.Linear(
                    student_hidden,
                    teacher_hidden,
                    dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    rngs=rngs,
                )
                for _ in range(pairs)
            ]
        )

    def __call__(self, pair: int, hidden_bte: jax.Array) -> jax.Array:
        return self.maps[pair](hidden_bte.astype(jnp.float32))


def forward(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    attention_layers: tuple[int, ...] = (),
    hidden_layers: tuple[int, ...] = (),
) -> tuple[jax.Array, dict[str, dict[int, jax.Array]]]:
    """(logits [B, T, V], {"attention_probs": {layer: ...}, "layer_hidden": {layer: ...}})."""
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        segment_ids=batch.get("segment_ids"),  # only packed batches have them
        attention_probs_layers=attention_layers,
        layer_hidden=hidden_layers,
    )
    if attention_layers or hidden_layers:
        return out
    return out, {"attention_probs": {}, "layer_hidden": {}}


def hidden_forward(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    attention_layers: tuple[int, ...] = (),
    hidden_layers: tuple[int, ...] = (),
) -> tuple[jax.Array, dict[str, dict[int, jax.Array]]]:
    """(final hidden states [B, T, E], {"attention_probs": ..., "layer_hidden": ...}): the
    forward without the LM head, whose logits the losses compute a chunk of tokens at a time."""
    taps = LayerTaps(tuple(attention_layers), tuple(hidden_layers))
    hidden, _ = model.hidden_states(
        batch["input_ids"],
        batch["attention_mask"],
        segment_ids=batch.get("segment_ids"),  # only packed batches have them
        taps=taps,
    )
    return hidden, {"attention_probs": taps.attention_probs, "layer_hidden": taps.hidden}


def make_loss(
    strategy: str,
    pairs: list[tuple[int, int]],
    *,
    temperature: float,
    alpha: float,
    beta: float | None = None,
) -> LossFn:
    """The traced loss for ``strategy`` over layer ``pairs`` ([(student, teacher), ...]).

    Every term over the vocabulary runs from final hidden states a chunk of tokens at a time
    (``chunked_logprobs``, ``chunked_generalized_jsd``): no [B, T, V] float32 logits array. The
    logit strategy is Hinton's T^2 x KL(teacher || student) with ``beta`` None, else GKD's
    generalised JSD with that beta (no T^2, as TRL). A batch with an ``on_policy`` column [B]
    (1: the row's completion was sampled by the student) trains the cross-entropy on the other
    rows only: the student's own samples are no labels.
    """
    student_layers = tuple(sorted({s for s, _ in pairs}))
    teacher_layers = tuple(sorted({t for _, t in pairs}))
    taps = {
        "logit": ({}, {}),
        "attention": (
            {"attention_layers": student_layers},
            {"attention_layers": teacher_layers},
        ),
        "feature": ({"hidden_layers": student_layers}, {"hidden_layers": teacher_layers}),
    }[strategy]

    def loss(models: Models, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        assert models.teacher is not None, "distill declares a teacher; the loop must load it"
        weights_bt, targets = batch["loss_weights"], batch["targets"]
        ce_weights_bt = weights_bt
        extra: Metrics = {}
        if "on_policy" in batch:
            on_policy = batch["on_policy"]
            ce_weights_bt = weights_bt * (1.0 - on_policy)[:, None]
            extra["on_policy"] = jnp.mean(on_policy)
        s_hidden, student = hidden_forward(models.policy, batch, **taps[0])
        t_hidden, teacher = jax.lax.stop_gradient(hidden_forward(models.teacher, batch, **taps[1]))
        ce, _ = sft_loss(chunked_logprobs(s_hidden, models.policy.logits, targets), ce_weights_bt)
        teacher_ce, _ = sft_loss(
            chunked_logprobs(t_hidden, models.teacher.logits, targets), ce_weights_bt
        )
        metrics = {
            "trained_tokens_per_row": jnp.mean(jnp.sum(weights_bt > 0, axis=-1).astype(jnp.float32))
        }
        if strategy == "logit":
            jsd_bt = dl.chunked_generalized_jsd(
                s_hidden,
                models.policy.logits,
                t_hidden,
                models.teacher.logits,
                beta=0.0 if beta is None else beta,  # 0: the forward KL(teacher || student)
                temperature=temperature,
            )
            distill = dl.weighted_token_mean(jsd_bt, weights_bt)
            if beta is None:
                distill = temperature * temperature * distill
        elif strategy == "attention":
            s_maps, t_maps = student["attention_probs"], teacher["attention_probs"]
            distill = jnp.mean(
                jnp.stack(
                    [dl.attention_kl_loss(s_maps[s], t_maps[t], weights_bt) for s, t in pairs]
                )
            )
        else:
            project = models.heads["projection"]
            s_hidden_l, t_hidden_l = student["layer_hidden"], teacher["layer_hidden"]
            distill = jnp.mean(
                jnp.stack(
                    [
                        dl.feature_mse_loss(project(k, s_hidden_l[s]), t_hidden_l[t], weights_bt)
                        for k, (s, t) in enumerate(pairs)
                    ]
                )
            )
        total = dl.mix(distill, ce, alpha)
        return total, {
            **metrics,
            **extra,
            "distill_loss": distill,
            "ce_loss": ce,
            "teacher_ce_loss": teacher_ce,
        }

    return loss


class OnPolicy:
    """GKD's on-policy batches (Agarwal et al. 2024; TRL's ``GKDTrainer``): on a step that
    ``on_policy_step(seed, step, lmbda)`` picks, the student samples a completion for each prompt
    of the SFT batch (``sampling.generate`` on the live weights, at ``temperature``, seeded by
    (seed, step) so a resumed run samples the same), and the row becomes the prompt and that
    sample; the teacher then scores the student's tokens inside the step. Other steps keep the
    dataset's completions. Every batch has ``on_policy`` [B] (1 for sampled rows)."""

    def __init__(self, source: Any, ctx: Context, *, lmbda: float, temperature: float):
        self.source, self.ctx = source, ctx
        self.lmbda, self.temperature = lmbda, temperature
        self.seed = ctx.spec.training.seed
        self.seq_len = ctx.spec.data.max_length
        self.pad_id = pad_id_of(ctx.tokenizer)

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        batch = self.source.next_batch(step)
        rows = batch["input_ids"].shape[0]
        if not dl.on_policy_step(self.seed, step, self.lmbda):
            return {**batch, "on_policy": np.zeros((rows,), np.float32)}
        return {**self.sample(batch, step), "on_policy": np.ones((rows,), np.float32)}

    def sample(self, batch: Mapping[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        tok = self.ctx.tokenizer
        prompts = []
        for ids, w, mask in zip(
            batch["input_ids"], batch["loss_weights"], batch["attention_mask"], strict=True
        ):
            trained = np.flatnonzero(w > 0)
            end = int(trained[0]) + 1 if trained.size else int(mask.sum())
            prompts.append([int(t) for t in ids[: max(end, 1)]])
        room = self.seq_len - max(len(p) for p in prompts)
        if room < 1:
            return dict(batch)
        gen = generate(
            self.ctx.model(),
            prompts,
            room,
            temperature=self.temperature,
            eos_id=tok.eos_token_id,
            seed=int(np.random.default_rng([self.seed, step, 1]).integers(2**31)),
            pad_id=self.pad_id,
        )
        tokens, keep = np.asarray(gen.tokens), np.asarray(gen.mask)
        examples = []
        for p, row, k in zip(prompts, tokens, keep, strict=True):
            sampled = [int(t) for t in row[k]]
            examples.append(
                Example(tuple(p + sampled), tuple([False] * len(p) + [True] * len(sampled)))
            )
        return sft_data.collate(examples, self.seq_len, self.pad_id)

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.source.restore(state)


def check_vocabularies(student: Any, teacher: Any) -> None:
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(
            f"spec.distill.teacher: the teacher's vocabulary has {teacher.vocab_size:,} tokens, the "
            f"student's (spec.model.base) {student.vocab_size:,}; distillation compares them token "
            "by token, so both must use the same tokenizer and vocabulary size"
        )


def layer_pairs(d: DistillSpec, student: Any, teacher: Any) -> list[tuple[int, int]]:
    if d.layers is None:
        return dl.default_layer_map(student.num_layers, teacher.num_layers)
    return dl.check_layer_map(d.layers, student.num_layers, teacher.num_layers)


def declare(spec: Any, configs: ModelConfigs) -> Declaration:
    d = spec.settings
    assert isinstance(d, DistillSpec)
    student, teacher = configs.policy, configs.of(d.teacher)
    check_vocabularies(student, teacher)
    pairs = layer_pairs(d, student, teacher)

    def heads(build: HeadBuilder) -> dict[str, nnx.Module]:
        if d.strategy != "feature":
            return {}
        return {
            "projection": Projections(
                len(pairs), student.hidden_size, teacher.hidden_size, rngs=build.rngs
            )
        }

    columns = sft_columns(spec)
    if d.on_policy:
        columns["on_policy"] = ((spec.training.batch_size,), np.float32)
    rollout = None
    if (
        d.on_policy
    ):  # what ``plan`` compiles for the student's sampling (worst case: 1-token prompt)
        L = spec.data.max_length
        sampling = SamplingSettings(max_new_tokens=L - 1, temperature=d.temperature)
        rollout = RolloutShape(spec.training.batch_size, spec.data.max_prompt_length, sampling)
    return Declaration(
        loss=make_loss(
            d.strategy, pairs, temperature=d.temperature, alpha=d.alpha, beta=d.jsd_beta
        ),
        columns=columns,
        heads=heads,
        rollout=rollout,
        # Frozen: stored in the compute dtype (no float32 master copy needed).
        teacher=ModelSpec(base=d.teacher, dtype=spec.model.dtype, param_dtype=spec.model.dtype),
    )


def build(ctx: Context) -> Algorithm:
    d = ctx.spec.settings
    assert isinstance(d, DistillSpec)
    ctx.log(
        f"distill: {d.strategy} from {d.teacher} into {ctx.config.num_layers} layers, hidden "
        f"{ctx.config.hidden_size}"
        + (f", temperature {d.temperature}" if d.strategy == "logit" else "")
        + (f", generalised JSD beta {d.jsd_beta}" if d.jsd_beta is not None else "")
        + (f", on-policy share {d.lmbda}" if d.on_policy else "")
        + f", alpha {d.alpha}"
    )
    algo = supervised(ctx, "distill", completion_only=True)
    if d.on_policy:
        if ctx.spec.data.packing:
            raise ValueError(
                "spec.distill.onPolicy: the student samples one completion per prompt; "
                "spec.data.packing packs several examples per row (set packing: false)"
            )
        algo.source = OnPolicy(algo.source, ctx, lmbda=d.lmbda, temperature=d.temperature)
    return algo
