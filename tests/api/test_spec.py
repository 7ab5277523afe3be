"""The PostTrainJob model: examples valid, defaults, invalid jobs named by field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from posttrain.api import JobInvalid, load_documents, parse_job
from posttrain.api import v1alpha1 as api
from posttrain.api.algorithms import ALGORITHMS, REGISTRY
from posttrain.api.settings.grpo import GrpoSpec
from posttrain.api.settings.sft import SftSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/**/*.yaml"))

MINIMAL: dict[str, Any] = {
    "apiVersion": "posttrain.dev/v1alpha1",
    "kind": "PostTrainJob",
    "metadata": {"name": "t"},
    "spec": {
        "algorithm": "grpo",
        "model": {"base": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "data": {"train": "gs://b/train.jsonl", "promptField": "question"},
        "grpo": {"rewards": [{"builtin": "math-answer"}]},
        "training": {"steps": 10},
        "resources": {"accelerator": "tpu-v5e", "topology": "2x4"},
    },
}


def job(**patches: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path patches: job(**{"spec.training.steps": 0}); None deletes."""
    doc = copy.deepcopy(MINIMAL)
    for dotted, value in patches.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


def errors_of(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(JobInvalid) as info:
        parse_job(doc)
    return {e.path: e.message for e in info.value.errors}


def test_there_is_an_example_per_algorithm() -> None:
    algorithms = {parse_job(d).spec.algorithm for p in EXAMPLES for d in load_documents(p)}
    assert algorithms == set(api.ALGORITHMS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_is_valid(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        parse_job(doc)


def block_of(algorithm: str) -> str:
    """The YAML name of the block an algorithm reads (``dr-grpo`` -> ``drGrpo``)."""
    return REGISTRY[algorithm].block


def rl_job(algorithm: str, **fields: Any) -> dict[str, Any]:
    """MINIMAL run by ``algorithm``, its block (rewards from MINIMAL) under its own name."""
    block = {**MINIMAL["spec"]["grpo"], **fields}
    return job(
        **{"spec.grpo": None, "spec.algorithm": algorithm, f"spec.{block_of(algorithm)}": block}
    )


def test_defaults() -> None:
    spec = parse_job(MINIMAL).spec
    assert spec.training.batch_size == 32
    assert spec.training.optimizer.name == "adamw"
    assert spec.training.schedule.name == "cosine" and spec.training.schedule.warmup_ratio == 0.03
    assert spec.training.max_grad_norm == 1.0
    assert spec.training.checkpoint.every_steps == 100 and spec.training.checkpoint.keep == 3
    assert spec.data.max_length == 1024 and spec.data.max_prompt_length == 512
    assert spec.resources.slices == 1
    assert spec.max_restarts == 3 and spec.suspend is False
    grpo = spec.settings
    assert isinstance(grpo, GrpoSpec) and grpo is spec.grpo
    assert (grpo.num_generations, grpo.beta, grpo.kl_estimator) == (8, 0.04, "k3")
    assert (grpo.epsilon, grpo.clip_high) == (0.2, 0.2)
    assert (spec.model.dtype, spec.model.param_dtype) == ("bfloat16", "float32")
    assert spec.output.export_dtype is None  # the base checkpoint's dtype
    assert grpo.rewards[0].weight == 1.0


def test_optional_blocks_default_and_each_algorithm_reads_its_own_block() -> None:
    sft = parse_job(job(**{"spec.algorithm": "sft", "spec.grpo": None})).spec
    assert sft.settings == SftSpec()
    for algorithm in ("gspo-token", "dapo", "dr-grpo"):
        spec = parse_job(rl_job(algorithm)).spec
        entry = REGISTRY[algorithm]
        assert spec.settings is getattr(spec, entry.field) and spec.grpo is None
        assert type(spec.settings) is entry.settings


def test_gspo_token_clip_defaults_are_the_papers_unless_set() -> None:
    def clip(doc: dict[str, Any]) -> tuple[float, float]:
        g = parse_job(doc).spec.settings
        assert isinstance(g, GrpoSpec)
        return g.epsilon, g.clip_high

    assert clip(rl_job("gspo-token")) == (3e-4, 4e-4)
    assert clip(rl_job("gspo-token", epsilon=1e-3, epsilonHigh=2e-3)) == (1e-3, 2e-3)
    assert clip(job()) == (0.2, 0.2)  # GRPO's own
    assert clip(job(**{"spec.grpo.epsilon": 0.1})) == (0.1, 0.1)  # unset: epsilonHigh = epsilon
    assert clip(job(**{"spec.grpo.epsilon": 0.1, "spec.grpo.epsilonHigh": 0.3})) == (0.1, 0.3)
    # A lower bound above the paper's upper one: the pair no longer holds, say which to set.
    errors = errors_of(rl_job("gspo-token", epsilon=1e-3))
    assert (
        "epsilonHigh (0.0004) must be at least epsilon (0.001)"
        in errors["spec.gspoToken.epsilonHigh"]
    )


GRPO_FAMILY = {
    # algorithm: (beta, epsilon, clip_high, advantage, lossAggregation, dynamicSampling, overlong)
    "grpo": (0.04, 0.2, 0.2, "group-std", "sequence-mean", False, "none"),
    "gspo-token": (0.04, 3e-4, 4e-4, "group-std", "sequence-mean", False, "none"),
    "dapo": (0.0, 0.2, 0.28, "group-std", "token-mean", True, "penalty"),
    "dr-grpo": (0.0, 0.2, 0.2, "group-mean", "constant-normalizer", False, "none"),
}


@pytest.mark.parametrize("algorithm", GRPO_FAMILY)
def test_each_algorithms_settings_type_holds_its_papers_defaults(algorithm: str) -> None:
    settings = REGISTRY[algorithm].settings
    # The type itself (no job around it) holds the paper's values, and so does a parsed job.
    typed = settings.model_validate({"rewards": [{"builtin": "math-answer"}]})
    g = parse_job(job() if algorithm == "grpo" else rl_job(algorithm)).spec.settings
    assert type(g) is settings and g == typed
    assert isinstance(g, GrpoSpec)
    got = (g.beta, g.epsilon, g.clip_high, g.advantage, g.loss_aggregation, g.dynamic_sampling)
    assert (*got, g.overlong.mode) == GRPO_FAMILY[algorithm]
    # DAPO's soft-penalty buffer: the paper's 4096 of 20480 tokens, i.e. maxNewTokens / 5.
    assert g.overlong.buffer == (256 // 5 if algorithm == "dapo" else None)
    if algorithm == "dapo":
        longer = parse_job(rl_job("dapo", maxNewTokens=1000)).spec.settings
        assert isinstance(longer, GrpoSpec) and longer.overlong.buffer == 200


def test_explicit_values_win_over_the_algorithm_defaults() -> None:
    mine = {
        "beta": 0.01,
        "epsilon": 0.1,
        "advantage": "group-mean",
        "lossAggregation": "sequence-mean",
        "dynamicSampling": False,
        "overlong": {"mode": "filter"},
    }
    g = parse_job(rl_job("dapo", **mine)).spec.settings
    assert isinstance(g, GrpoSpec)
    assert (g.beta, g.clip_high, g.advantage, g.loss_aggregation) == (
        0.01, 0.28, "group-mean", "sequence-mean"
    )  # fmt: skip
    assert (g.dynamic_sampling, g.overlong.mode) == (False, "filter")
    rounds = {
        "dynamicSampling": True,
        "maxSamplingRounds": 3,
        "overlong": {"mode": "penalty", "buffer": 64},
    }
    g = parse_job(job(**{f"spec.grpo.{k}": v for k, v in rounds.items()})).spec.settings
    assert isinstance(g, GrpoSpec)
    assert (g.dynamic_sampling, g.max_sampling_rounds, g.overlong.mode, g.overlong.buffer) == (
        True, 3, "penalty", 64
    )  # fmt: skip


@pytest.mark.parametrize("algorithm", ["dapo", "dr-grpo", "gspo-token"])
def test_spec_grpo_with_another_algorithm_is_refused_saying_what_to_write(algorithm: str) -> None:
    errors = errors_of(job(**{"spec.algorithm": algorithm}))
    assert set(errors) == {"spec.grpo"}, errors
    message = errors["spec.grpo"]
    assert f"`{block_of(algorithm)}:`" in message and "`grpo:`" in message
    assert f"algorithm {algorithm} reads spec.{block_of(algorithm)}" in message


def test_warm_up_needs_no_kl_and_dapo_has_none_by_default() -> None:
    assert "spec.grpo.beta" in errors_of(job(**{"spec.grpo.sftWarmupSteps": 5}))
    warm = parse_job(rl_job("dapo", sftWarmupSteps=5)).spec.settings
    assert isinstance(warm, GrpoSpec) and (warm.sft_warmup_steps, warm.beta) == (5, 0.0)


@pytest.mark.parametrize(
    "overlong", [None, {"mode": "filter"}, {"mode": "penalty"}, {"mode": "penalty", "buffer": 8}]
)
def test_round_trip_through_manifest(overlong: dict[str, Any] | None) -> None:
    parsed = parse_job(job(**{"spec.grpo.overlong": overlong}))
    again = parse_job(parsed.to_manifest())
    assert again == parsed
    assert parsed.to_manifest()["spec"]["training"]["batchSize"] == 32  # camelCase out


@pytest.mark.parametrize("algorithm", ["dapo", "dr-grpo", "gspo-token"])
def test_round_trip_keeps_each_algorithms_block(algorithm: str) -> None:
    parsed = parse_job(rl_job(algorithm))
    manifest = parsed.to_manifest()
    assert block_of(algorithm) in manifest["spec"] and "grpo" not in manifest["spec"]
    assert parse_job(manifest) == parsed


PPO = {"rewards": [{"builtin": "length-penalty"}]}
RL = {"rewards": [{"builtin": "math-answer"}]}

INVALID = [
    # (patches, field path, a fragment of the message)
    ({"spec.training.steps": 0}, "spec.training.steps", "greater than or equal to 1"),
    ({"spec.training.batchSize": "many"}, "spec.training.batchSize", "valid integer"),
    ({"spec.trainig": {"steps": 1}}, "spec.trainig", "did you mean 'training'"),
    (
        {"spec.training.learningrate": 1e-4},
        "spec.training.learningrate",
        "did you mean 'learningRate'",
    ),
    (
        {"spec.algorithm": "rlhf"},
        "spec.algorithm",
        ", ".join(repr(a) for a in ALGORITHMS[:-1]) + f" or {ALGORITHMS[-1]!r}",
    ),
    ({"spec.grpo": None}, "spec.grpo", "algorithm grpo needs spec.grpo"),
    ({"spec.dpo": {"beta": 0.1}}, "spec.dpo", "algorithm is grpo"),
    (
        {
            "spec.algorithm": "dpo",
            "spec.grpo": None,
            "spec.dpo": {"lossType": "hinge", "labelSmoothing": 0.1},
        },
        "spec.dpo.labelSmoothing",
        "applies to lossType sigmoid",
    ),
    ({"spec.grpo.rewards": []}, "spec.grpo.rewards", "at least 1 item"),
    (
        {"spec.grpo.rewards": [{"builtin": "math-answer", "function": "m:f"}]},
        "spec.grpo.rewards[0]",
        "exactly one",
    ),
    (
        {"spec.grpo.rewards": [{"builtin": "vibes"}]},
        "spec.grpo.rewards[0].builtin",
        "'math-answer'",
    ),
    (
        {"spec.grpo.rewards": [{"builtin": "regex-format"}]},
        "spec.grpo.rewards[0].pattern",
        "needs pattern",
    ),
    ({"spec.grpo.rewards": [{"function": "no_colon"}]}, "spec.grpo.rewards[0].function", "pattern"),
    ({"spec.grpo.numGenerations": 1}, "spec.grpo.numGenerations", "greater than or equal to 2"),
    (
        {"spec.grpo.lossAggregation": "mean"},
        "spec.grpo.lossAggregation",
        "'sequence-mean', 'token-mean' or 'constant-normalizer'",
    ),
    (
        {"spec.grpo.overlong": {"mode": "penalty", "buffer": 300}},
        "spec.grpo.overlong.buffer",
        "at most maxNewTokens (256)",
    ),
    (
        {"spec.grpo.overlong": {"mode": "filter", "buffer": 16}},
        "spec.grpo.overlong.buffer",
        "for mode penalty, not filter",
    ),
    ({"spec.grpo.overlong": {"mode": "cut"}}, "spec.grpo.overlong.mode", "'filter'"),
    (
        {
            "spec.algorithm": "dapo",
            "spec.grpo": None,
            "spec.dapo.rewards": [{"builtin": "math-answer"}, {"function": "m:overlong"}],
        },
        "spec.dapo.rewards[1].name",
        "names the overlong penalty",
    ),
    (
        {"spec.grpo.sftWarmupSteps": 5},
        "spec.grpo.beta",
        "beta (0.04) must be 0 with sftWarmupSteps (5)",
    ),
    (
        {"spec.grpo.epsilon": 0.3, "spec.grpo.epsilonHigh": 0.25},
        "spec.grpo.epsilonHigh",
        "epsilonHigh (0.25) must be at least epsilon (0.3)",
    ),
    (  # DAPO's clip-higher 0.28 holds with its epsilon 0.2: a larger epsilon needs both set
        {"spec.algorithm": "dapo", "spec.grpo": None, "spec.dapo": {**RL, "epsilon": 0.3}},
        "spec.dapo.epsilonHigh",
        "must be at least epsilon (0.3)",
    ),
    ({"spec.resources.topology": "2x3"}, "spec.resources.topology", "valid: 1x1, 2x2, 2x4, 4x4"),
    ({"spec.resources.topology": None}, "spec.resources.topology", "required for tpu-v5e"),
    (
        {"spec.resources.accelerator": "nvidia-h100"},
        "spec.resources.topology",
        "topology is for TPUs",
    ),
    (
        {"spec.resources": {"accelerator": "nvidia-l4", "gpusPerNode": 12}},
        "spec.resources.gpusPerNode",
        "exceeds 8",
    ),
    (
        {"spec.resources": {"accelerator": "cpu", "slices": 2}},
        "spec.resources.slices",
        "slices is for TPUs",
    ),
    (
        {"spec.resources": {"accelerator": "tpu-v4", "topology": "2x4"}},
        "spec.resources.topology",
        "2x2x1",
    ),
    ({"spec.resources.accelerator": "tpu-v7"}, "spec.resources.accelerator", "'tpu-v5e'"),
    ({"spec.model.quantization": {"type": "nf4"}}, "spec.model.quantization", "needs lora"),
    ({"spec.model.lora": {"rank": 0}}, "spec.model.lora.rank", "greater than or equal to 1"),
    (
        {"spec.training.microBatchSize": 5},
        "spec.training.microBatchSize",
        "multiple of microBatchSize",
    ),
    ({"spec.data.maxPromptLength": 2048}, "spec.data.maxPromptLength", "less than maxLength"),
    ({"spec.data.train": None}, "spec.data.train", "required"),
    (
        {"spec.training.mesh": {"data": -1, "fsdp": -1}},
        "spec.training.mesh",
        "at most one mesh axis",
    ),
    ({"metadata.name": "Bad_Name"}, "metadata.name", "pattern"),
    # renamed fields name their new name (one name for one concept across blocks)
    (
        {"spec.algorithm": "ppo", "spec.grpo": None, "spec.ppo": {**PPO, "clipRange": 0.1}},
        "spec.ppo.clipRange",
        "renamed: write 'epsilon'",
    ),
    (
        {"spec.algorithm": "ppo", "spec.grpo": None, "spec.ppo": {**PPO, "lam": 0.9}},
        "spec.ppo.lam",
        "renamed: write 'lambda'",
    ),
    (
        {"spec.algorithm": "ppo", "spec.grpo": None, "spec.ppo": {**PPO, "sftWarmupSteps": 5}},
        "spec.ppo.klCoef",
        "must be 0 with sftWarmupSteps",
    ),
    (
        {"spec.algorithm": "ppo", "spec.grpo": None, "spec.ppo": {**PPO, "numMiniBatches": 0}},
        "spec.ppo.numMiniBatches",
        "greater than or equal to 1",
    ),
    ({"apiVersion": "posttrain.dev/v1"}, "apiVersion", "posttrain.dev/v1alpha1"),
    (
        {
            "spec.env": [
                {
                    "name": "A",
                    "value": "1",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                }
            ]
        },
        "spec.env[0].valueFrom",
        "not both",
    ),
]


@pytest.mark.parametrize(("patches", "path", "fragment"), INVALID, ids=[p for _, p, _ in INVALID])
def test_invalid_job_names_the_field(patches: dict[str, Any], path: str, fragment: str) -> None:
    errors = errors_of(job(**patches))
    assert path in errors, f"expected an error at {path}, got {errors}"
    assert fragment in errors[path]


def test_all_field_errors_reported_at_once() -> None:
    errors = errors_of(
        job(**{"spec.training.steps": -1, "spec.data.format": "csv", "spec.bogus": 1})
    )
    assert {"spec.training.steps", "spec.data.format", "spec.bogus"} <= set(errors)


def test_display_helpers() -> None:
    spec = parse_job(MINIMAL).spec
    assert api.display_model(spec.model.base) == "Qwen2.5-0.5B-Instruct"
    assert api.display_accelerator(spec.resources) == "tpu-v5e-8"
    multi = api.ResourcesSpec(accelerator="tpu-v5p", topology="2x2x2", slices=2)
    assert api.display_accelerator(multi) == "2xtpu-v5p-8"
    gpu = api.ResourcesSpec(accelerator="nvidia-h100", nodes=2)
    assert api.display_accelerator(gpu) == "nvidia-h100x16"
    assert api.display_progress(120, 1000) == "12%"
