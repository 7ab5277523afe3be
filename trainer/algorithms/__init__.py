"""The trainer's view of the algorithm registry (``posttrain/api/algorithms.py``, one line per
algorithm: its settings type and the module here with ``declare`` and ``build``).

Looking one up imports nothing heavy, so an algorithm that is not built into this trainer fails at
once, before JAX touches an accelerator.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from posttrain.api.algorithms import ALGORITHMS
from posttrain.api.algorithms import REGISTRY as API_REGISTRY

# spec.algorithm -> module, from the API's registry (tests may remove an entry).
REGISTRY: dict[str, str] = {name: e.module for name, e in API_REGISTRY.items()}


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
