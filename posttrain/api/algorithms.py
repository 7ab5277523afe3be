"""The algorithm registry: ``spec.algorithm`` name -> its settings type and its trainer module.

One line per algorithm. From it come the ``spec.algorithm`` enum, the job spec's blocks
(``spec.<block>``, the name in camelCase: ``dr-grpo`` reads ``spec.drGrpo``), the CRD's CEL rules
and the trainer's registry. The trainer module is named as a string so that this module imports
neither JAX nor the trainer (the operator and ``posttrain validate`` read it too).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic.alias_generators import to_camel

from posttrain.api.base import Spec
from posttrain.api.settings.dapo import DapoSpec
from posttrain.api.settings.distill import DistillSpec
from posttrain.api.settings.dpo import DpoSpec
from posttrain.api.settings.dr_grpo import DrGrpoSpec
from posttrain.api.settings.grpo import GrpoSpec
from posttrain.api.settings.gspo_token import GspoTokenSpec
from posttrain.api.settings.kto import KtoSpec
from posttrain.api.settings.orpo import OrpoSpec
from posttrain.api.settings.ppo import PpoSpec
from posttrain.api.settings.reinforce_plus_plus import ReinforcePlusPlusSpec
from posttrain.api.settings.rloo import RlooSpec
from posttrain.api.settings.sft import SftSpec

TRAINER = "posttrain.trainer.algorithms."


@dataclass(frozen=True)
class Entry:
    name: str  # spec.algorithm
    settings: type[Spec]  # the type of its block
    module: str  # the trainer module: declare(spec, config) and build(ctx)
    summary: str  # one line for the docs and the CRD

    @property
    def field(self) -> str:
        """The block's Python field name (``dr_grpo``)."""
        return self.name.replace("-", "_").replace("+", "_plus")

    @property
    def block(self) -> str:
        """The block's YAML name (``drGrpo``)."""
        return to_camel(self.field)

    @property
    def required(self) -> bool:
        """A block with required fields (rewards, a teacher) must be written; others default.
        A settings type whose requirement is a rule across fields (the GRPO family: rewards or an
        environment) says so with ``block_required = True``."""
        if getattr(self.settings, "block_required", False):
            return True
        return any(f.is_required() for f in self.settings.model_fields.values())


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("sft", SftSpec, TRAINER + "sft", "supervised fine-tuning"),
        Entry("ppo", PpoSpec, TRAINER + "ppo", "PPO with a learned critic and GAE"),
        Entry("grpo", GrpoSpec, TRAINER + "grpo", "GRPO: group-relative advantages"),
        Entry("gspo-token", GspoTokenSpec, TRAINER + "gspo_token", "GSPO-token: sequence ratio"),
        Entry("dapo", DapoSpec, TRAINER + "dapo", "DAPO: clip-higher, dynamic sampling"),
        Entry("dr-grpo", DrGrpoSpec, TRAINER + "dr_grpo", "Dr. GRPO: unbiased GRPO"),
        Entry("dpo", DpoSpec, TRAINER + "dpo", "DPO and its losses, on preference pairs"),
        Entry("orpo", OrpoSpec, TRAINER + "orpo", "ORPO: odds-ratio preference, no reference"),
        Entry("kto", KtoSpec, TRAINER + "kto", "KTO: unpaired answers labelled desirable or not"),
        Entry("distill", DistillSpec, TRAINER + "distill", "distillation from a frozen teacher"),
        Entry("rloo", RlooSpec, TRAINER + "rloo", "RLOO: leave-one-out baseline"),
        Entry(
            "reinforce-plus-plus",
            ReinforcePlusPlusSpec,
            TRAINER + "reinforce_plus_plus",
            "REINFORCE++: batch-whitened returns, KL in the reward",
        ),
    )
}
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def entry(name: str) -> Entry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"spec.algorithm: unknown algorithm {name!r}; allowed: {', '.join(ALGORITHMS)}"
        ) from None
