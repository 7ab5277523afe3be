"""What travels between the trainer and its rollout workers, as bytes (pure, no I/O).

Weights: the trainable state's leaves (all parameters, or LoRA adapters only: the frozen base is
loaded by both sides from the same checkpoint) in one safetensors blob, named by their pytree
paths; the receiver checks the names against its own tree, so a mismatch is an error and never a
silent reshuffle. Trajectories: a sampled, scored rollout batch (``rollout.Rollout``) with its
index and the policy version that sampled it, the arrays in safetensors and the rest as JSON in
its metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

META = "posttrain"


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- weights


def encode_weights(named: dict[str, np.ndarray], version: int) -> bytes:
    # safetensors' numpy API has no bfloat16: such leaves travel as their raw 16 bits, named in
    # the metadata, and are viewed back on arrival (no rounding either way).
    raw = sorted(k for k, v in named.items() if v.dtype.name == "bfloat16")
    tensors = {k: (v.view(np.uint16) if k in raw else v) for k, v in named.items()}
    return st_save(tensors, metadata={META: json.dumps({"version": version, "bfloat16": raw})})


def decode_weights(blob: bytes, expect: list[str]) -> dict[str, np.ndarray]:
    """The named arrays, refused unless they are exactly ``expect`` (the receiver's own tree)."""
    import ml_dtypes

    named = st_load(blob)
    for k in json.loads(_metadata(blob)[META]).get("bfloat16", []):
        named[k] = named[k].view(ml_dtypes.bfloat16)
    if sorted(named) != sorted(expect):
        missing, extra = sorted(set(expect) - set(named)), sorted(set(named) - set(expect))
        raise ValueError(
            f"weights do not match this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return named


def _metadata(blob: bytes) -> dict[str, str]:
    """A safetensors blob's string metadata: a u64 header length, then the JSON header."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__") or {}


def weights_version(blob: bytes) -> int:
    return int(json.loads(_metadata(blob)[META])["version"])


# --------------------------------------------------------------------------- trajectories


@dataclass
class Trajectories:
    """One rollout batch as a worker sends it: ``rollout.Rollout``'s fields plus provenance."""

    index: int  # the rollout batch
    version: int  # the policy version that sampled it
    run: str  # the trainer incarnation that handed out that version
    worker: int
    arrays: dict[str, np.ndarray]
    rewards: np.ndarray
    reward_terms: dict[str, np.ndarray]
    lengths: np.ndarray
    seconds: float  # generation time
    texts: list[str] | None = None
    stats: dict[str, float] = field(default_factory=dict)  # the worker's weight-sync figures


def encode_trajectories(t: Trajectories) -> bytes:
    tensors = {f"a/{k}": np.ascontiguousarray(v) for k, v in t.arrays.items()}
    tensors["rewards"] = np.asarray(t.rewards, np.float32)
    tensors["lengths"] = np.asarray(t.lengths, np.int32)
    tensors.update({f"r/{k}": np.asarray(v, np.float32) for k, v in t.reward_terms.items()})
    meta = {
        "index": t.index,
        "version": t.version,
        "run": t.run,
        "worker": t.worker,
        "seconds": t.seconds,
        "texts": t.texts,
        "stats": t.stats,
    }
    return st_save(tensors, metadata={META: json.dumps(meta)})


def decode_trajectories(blob: bytes) -> Trajectories:
    tensors = st_load(blob)
    meta: dict[str, Any] = json.loads(_metadata(blob)[META])
    return Trajectories(
        index=int(meta["index"]),
        version=int(meta["version"]),
        run=str(meta["run"]),
        worker=int(meta["worker"]),
        arrays={k[2:]: v for k, v in tensors.items() if k.startswith("a/")},
        rewards=tensors["rewards"],
        reward_terms={k[2:]: v for k, v in tensors.items() if k.startswith("r/")},
        lengths=tensors["lengths"],
        seconds=float(meta["seconds"]),
        texts=meta.get("texts"),
        stats={k: float(v) for k, v in (meta.get("stats") or {}).items()},
    )
