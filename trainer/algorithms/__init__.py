"""Algorithms, registered by the name used in ``spec.algorithm`` (one name in YAML, registry, module).

The registry maps each built algorithm to the module defining ``build(ctx) -> Algorithm``
(see ``base.py``). Looking one up imports nothing heavy, so an algorithm that is not built yet
fails at once, before JAX touches an accelerator.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from posttrain.api.v1alpha1 import ALGORITHMS

# spec.algorithm -> module. Add a line here when an algorithm lands.
REGISTRY: dict[str, str] = {
    "sft": "posttrain.trainer.algorithms.sft",
    "grpo": "posttrain.trainer.algorithms.grpo",
    "gspo-token": "posttrain.trainer.algorithms.gspo_token",
    "ppo": "posttrain.trainer.algorithms.ppo",
    "dapo": "posttrain.trainer.algorithms.dapo",
    "dr-grpo": "posttrain.trainer.algorithms.dr_grpo",
    "dpo": "posttrain.trainer.algorithms.dpo",
    "orpo": "posttrain.trainer.algorithms.orpo",
    "distill": "posttrain.trainer.algorithms.distill",
}


class AlgorithmNotBuilt(ValueError):
    """spec.algorithm names an algorithm the API accepts but this trainer does not implement yet."""


def built() -> list[str]:
    """Algorithms whose module is present in this trainer."""
    return [name for name, mod in REGISTRY.items() if importlib.util.find_spec(mod) is not None]


def check(name: str) -> str:
    """The module path for ``name``, or AlgorithmNotBuilt naming it and the built ones."""
    if name not in ALGORITHMS:
        raise AlgorithmNotBuilt(
            f"spec.algorithm: unknown algorithm {name!r}; the API allows {', '.join(ALGORITHMS)}"
        )
    available = built()
    if name not in available:
        raise AlgorithmNotBuilt(
            f"spec.algorithm: {name!r} is not built into this trainer yet; "
            f"built: {', '.join(available) or 'none'}"
        )
    return REGISTRY[name]


def load(name: str) -> ModuleType:
    return importlib.import_module(check(name))
