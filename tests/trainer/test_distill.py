"""Distillation on the plug-in: each strategy's term trains the student (and the projection, also
under LoRA) and never the teacher; jobs with a mismatched vocabulary or layer pairs out of range
are refused before training, naming the field; (slow) a trained teacher's held-out loss is
approached by a smaller student."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from posttrain.api.v1alpha1 import DataSpec, ModelSpec
from posttrain.trainer.algorithms import distill, distill_loss
from posttrain.trainer.algorithms.base import Context, HeadBuilder, ModelConfigs
from posttrain.trainer.data import sft as data
from posttrain.trainer.loop import build_model, load_tokenizer, split_trainable, train
from posttrain.trainer.loop_step import Trainee, trainee_view
from posttrain.trainer.models import make_mesh
from posttrain.trainer.setup import model_config

sys.path.insert(0, str(Path(__file__).parent))
import loop_jobs  # noqa: E402

LORA = {"rank": 4, "alpha": 8}


def models(lora=None):
    student_spec = ModelSpec(base="builtin:tiny", dtype="float32", lora=lora)
    tok = load_tokenizer(student_spec)
    student = build_model(student_spec, tok, make_mesh(), seed=0)
    teacher = build_model(ModelSpec(base="builtin:small", dtype="float32"), tok, make_mesh(), 1)
    return student_spec, tok, student, teacher


def batch(tok) -> dict[str, jnp.ndarray]:
    spec = DataSpec(train="unused", max_length=12, max_prompt_length=7)
    rows = [{"prompt": "12+7=", "completion": "19"}, {"prompt": "3+4=", "completion": "7"}]
    examples = [data.prompt_completion_example(r, "t", tok, spec, True) for r in rows]
    return {k: jnp.asarray(v) for k, v in data.collate(examples, 12, tok.pad_token_id).items()}


def nonzero(tree) -> bool:
    return any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "strategy, lora",
    [("logit", None), ("attention", None), ("feature", None), ("feature", LORA)],
)
def test_gradients_reach_the_student_and_projection_never_the_teacher(strategy, lora):
    spec, tok, student, teacher = models(lora)
    pairs = distill_loss.default_layer_map(2, 4)  # tiny (2 layers) <- small (4 layers)
    heads = {}
    if strategy == "feature":
        heads["projection"] = distill.Projections(len(pairs), 64, 128, rngs=nnx.Rngs(3))
    graphdef, params, frozen = split_trainable(Trainee(student, heads), spec.lora)
    t_graphdef, t_state = nnx.split(teacher)
    view = trainee_view(graphdef, t_graphdef)
    # alpha 1: the strategy's term alone, so what moves is moved by distillation.
    loss = distill.make_loss(strategy, pairs, temperature=2.0, alpha=1.0)
    b = batch(tok)

    def total(p, t):
        value, metrics = loss(view(p, frozen, {"teacher": t}), b)
        return value, metrics

    (value, metrics), (g_student, g_teacher) = jax.jit(
        jax.value_and_grad(total, argnums=(0, 1), has_aux=True)
    )(params, t_state)
    assert float(value) == pytest.approx(float(metrics["distill_loss"])) and float(value) > 0
    assert {"ce_loss", "teacher_ce_loss", "distill_loss"} <= set(metrics)
    assert not nonzero(g_teacher)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(g_student)}
    policy = {k: v for k, v in flat.items() if k.startswith("policy/")}
    assert nonzero(policy)
    if lora is not None:
        assert all("lora" in k for k in policy)
    if strategy == "attention":  # the maps depend on queries and keys only
        assert nonzero({k: v for k, v in policy.items() if "k_proj" in k})
    if strategy == "feature":
        assert nonzero({k: v for k, v in flat.items() if k.startswith("heads/projection/")})
    else:
        assert not any(k.startswith("heads/") for k in flat)


def job_and_configs(tmp_path, **distill_spec) -> tuple[Any, ModelConfigs]:
    """The job and the model configs its declaration reads (as ``setup.build_run`` gives them)."""
    job = loop_jobs.job(tmp_path, algorithm="distill", distill=distill_spec)
    tok = load_tokenizer(job.spec.model)
    config_of = lambda ref: model_config(ref, tok)  # noqa: E731
    return job, ModelConfigs(config_of(job.spec.model.base), config_of)


def test_declaration_holds_the_teacher_and_the_projection_head(tmp_path):
    job, configs = job_and_configs(tmp_path, teacher="builtin:small", strategy="feature")
    declared = distill.declare(job.spec, configs)
    assert declared.teacher is not None
    assert declared.teacher.base == "builtin:small" and declared.teacher.lora is None
    # Frozen: the teacher is kept in the compute dtype, no float32 master copy.
    assert declared.teacher.param_dtype == declared.teacher.dtype == job.spec.model.dtype
    assert declared.heads is not None and not declared.reference
    heads = declared.heads(HeadBuilder(configs.policy, nnx.Rngs(0), lambda m: None))
    assert list(heads) == ["projection"] and len(heads["projection"].maps) == 2
    tok = load_tokenizer(job.spec.model)
    ctx = Context(job=job, tokenizer=tok, output_dir=str(tmp_path), config=configs.policy)
    assert distill.build(ctx).eval_batches is not None  # spec.data.eval, as for SFT


def test_layer_pairs_out_of_range_name_the_field(tmp_path):
    job, configs = job_and_configs(
        tmp_path, teacher="builtin:small", strategy="attention", layers=[[0, 1], [2, 9]]
    )
    with pytest.raises(ValueError) as err:  # at declaration, before any model is built
        distill.declare(job.spec, configs)
    assert (
        "spec.distill.layers[1]: student layer 2 is out of range for a student with 2 layers"
        in str(err.value)
    )
    assert "teacher layer 9 is out of range for a teacher with 4 layers (0..3)" in str(err.value)


def test_a_teacher_with_another_vocabulary_is_refused_before_training(tmp_path):
    from posttrain.trainer.models import builtin_config

    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    other = builtin_config("tiny", vocab_size=500)
    (teacher_dir / "config.json").write_text(json.dumps(other.to_hf()))  # weights never read
    job = loop_jobs.job(tmp_path, algorithm="distill", distill={"teacher": str(teacher_dir)})
    with pytest.raises(ValueError) as err:
        train(job, str(tmp_path / "out"), progress_bar=False)
    tok = load_tokenizer(job.spec.model)
    assert str(err.value).startswith(
        "spec.distill.teacher: the teacher's vocabulary has 500 tokens"
    )
    assert f"the student's (spec.model.base) {tok.vocab_size}" in str(err.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_quickstart_recipe_is_valid():
    from posttrain.api import load_documents, parse_job

    root = Path(__file__).resolve().parents[2]
    (doc,) = load_documents(root / "examples" / "local" / "distill-quickstart.yaml")
    spec = parse_job(doc).spec
    assert spec.algorithm == "distill" and spec.model.base == "builtin:micro"
    assert spec.distill is not None and spec.distill.teacher == "/tmp/sft-quickstart/final"


def evals(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r]


@pytest.mark.slow
def test_student_held_out_loss_falls_toward_the_teachers(tmp_path):
    """The quickstart in small: SFT a tiny teacher, then distil it into the micro student with
    attention transfer."""
    loop_jobs.enable_compile_cache()
    steps = {"steps": 160, "batchSize": 32, "evalEverySteps": 20, "logEverySteps": 20}
    teacher_run = train(
        loop_jobs.job(tmp_path, training=steps), str(tmp_path / "teacher"), progress_bar=False
    )
    teacher_loss = evals(tmp_path / "teacher")[-1]["eval_loss"]
    student = loop_jobs.job(
        tmp_path,
        algorithm="distill",
        model={"base": "builtin:micro"},
        distill={"teacher": teacher_run.export_dir, "strategy": "attention", "alpha": 0.5},
        training=steps,
    )
    train(student, str(tmp_path / "student"), progress_bar=False)
    records = evals(tmp_path / "student")
    # The teacher is the SFT run's export, frozen: its held-out loss is what that run measured.
    for r in records:
        assert r["eval_teacher_ce_loss"] == pytest.approx(teacher_loss, rel=1e-4)
    first_gap = records[0]["eval_ce_loss"] - teacher_loss
    last_gap = records[-1]["eval_ce_loss"] - teacher_loss
    assert first_gap > 0 and last_gap < 0.6 * first_gap, [r["eval_ce_loss"] for r in records]


@pytest.mark.slow
def test_projection_under_lora_resumes_from_checkpoints_and_is_not_exported(tmp_path):
    """The feature strategy's projection head: checkpointed (a resumed run equals an
    uninterrupted one) and left out of the exported student."""
    from safetensors import safe_open

    loop_jobs.enable_compile_cache()

    def run(name, stop_after=None):
        job = loop_jobs.job(
            tmp_path,
            algorithm="distill",
            model={"lora": LORA},
            distill={"teacher": "builtin:small", "strategy": "feature", "alpha": 0.5},
            training={"steps": 4, "logEverySteps": 1, "checkpoint": {"everySteps": 2}},
        )
        return train(job, str(tmp_path / name), progress_bar=False, stop_after=stop_after)

    whole = run("whole")
    assert run("resumed", stop_after=2).preempted
    run("resumed")

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["distill_loss"] for r in map(json.loads, lines) if "distill_loss" in r}

    whole_losses, resumed_losses = losses("whole"), losses("resumed")
    assert whole_losses[4] == pytest.approx(resumed_losses[4], rel=1e-5)
    assert whole_losses[4] < whole_losses[1]  # the projection and adapters learn
    assert whole.export_dir is not None
    with safe_open(str(Path(whole.export_dir) / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert names and not any("projection" in n or "heads" in n or "lora" in n for n in names)
