"""ModelConfig: one frozen description of a decoder-only LM, parsed from a Hugging Face config.json.

Both config layouts are read:
- transformers 5: RoPE settings in ``rope_parameters`` (Gemma 3: one dict per layer type), ``layer_types``;
- transformers 4.x (most hub checkpoints): ``rope_theta`` + ``rope_scaling``, Gemma 3's
  ``rope_local_base_freq`` and ``sliding_window_pattern``.
``rope_parameters`` wins when present; transformers 4.57 silently ignores it, we do not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")

_GEMMA = ("gemma2", "gemma3_text")

# Hugging Face's sampling defaults beside config.json; its eos_token_id is what generate stops on.
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type. ``type`` names the HF ``rope_type``."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, computed as transformers does."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
            head_dim
        )
        inv = (1.0 / (np.float32(self.theta) ** exponent)).astype(np.float32)
        if self.type == "default":
            return inv
        if self.type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.type == "llama3":
            return _llama3_inv_freq(inv, self)
        raise ValueError(
            f"rope type {self.type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.type}
        if self.type == "linear":
            out["factor"] = self.factor
        if self.type == "llama3":
            out.update(
                factor=self.factor,
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


def _llama3_inv_freq(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling (transformers' ``_compute_llama3_parameters``)."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer. Family switches are explicit fields, not model_type checks."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()  # full-attention layers
    rope_local: RopeConfig | None = None  # sliding layers when they differ (Gemma 3)
    layer_types: tuple[str, ...] = ()  # per layer: full_attention | sliding_attention
    sliding_window: int | None = None
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: bool = False  # Gemma: norm weights stored as w, applied as (1 + w)
    sandwich_norm: bool = False  # Gemma 2/3: extra norms after attention and around the MLP
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = (
        None  # attention scale is its -1/2 power (else head_dim's)
    )
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # generation_config.json's eos_token_id (Llama 3 instruct: 128001, 128008, 128009), when one
    # was read beside config.json; see eos_token_ids. Not part of equality.
    generation_eos_token_id: int | tuple[int, ...] | None = dataclasses.field(
        default=None, compare=False
    )
    # The config.json it came from, written back by save_pretrained; not part of equality.
    hf_config: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types {bad} not supported; supported: {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError(
                "layer_types has sliding_attention layers but sliding_window is not set"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"activation {self.hidden_act!r} not supported; supported: {SUPPORTED_ACTIVATIONS}"
            )
        for rope in (self.rope, self.rope_local):
            if rope is not None and rope.type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_type {rope.type!r} not supported; supported: {SUPPORTED_ROPE_TYPES}"
                )

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_for(self, layer_type: str) -> RopeConfig:
        if layer_type == "sliding_attention" and self.rope_local is not None:
            return self.rope_local
        return self.rope

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (
            (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: generation_config.json's ``eos_token_id`` (what
        transformers' ``generate`` stops on), then config.json's, without repeats."""
        ids: list[int] = []
        for source in (self.generation_eos_token_id, self.eos_token_id):
            for i in (source,) if isinstance(source, int) else source or ():
                if i not in ids:
                    ids.append(i)
        return tuple(ids)

    def with_generation_config(self, generation: Mapping[str, Any]) -> ModelConfig:
        """This config with a generation_config.json's EOS ids (its other fields are not used)."""
        eos = generation.get("eos_token_id")
        return dataclasses.replace(
            self, generation_eos_token_id=tuple(eos) if isinstance(eos, list) else eos
        )

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face config dict (transformers 5 or 4.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        gemma = model_type in _GEMMA
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope, rope_local = _parse_rope(hf, model_type)
        attention_bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":  # Qwen2 always has q/k/v biases and no o_proj bias
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias
        act = hf.get("hidden_activation") if gemma else None
        act = act or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope,
            rope_local=rope_local,
            layer_types=_parse_layer_types(hf, model_type, num_layers),
            sliding_window=hf.get("sliding_window"),
            hidden_act=act,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_offset=gemma,
            sandwich_norm=gemma,
            scale_embeddings=gemma,
            # Absent keys take transformers' defaults (Gemma 2 caps at 50 and 30, Gemma 3 does not cap).
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else None,
            attn_logit_softcapping=hf.get(
                "attn_logit_softcapping", 50.0 if model_type == "gemma2" else None
            )
            if gemma
            else None,
            final_logit_softcapping=hf.get(
                "final_logit_softcapping", 30.0 if model_type == "gemma2" else None
            )
            if gemma
            else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
        )

    @classmethod
    def from_json_file(cls, path: str) -> ModelConfig:
        """A config.json, with the EOS ids of a generation_config.json beside it if there is one."""
        with open(path) as f:
            config = cls.from_hf(json.load(f))
        generation = os.path.join(os.path.dirname(path), GENERATION_CONFIG_FILE)
        if os.path.exists(generation):
            with open(generation) as f:
                config = config.with_generation_config(json.load(f))
        return config

    def to_hf(self) -> dict[str, Any]:
        """The config.json to write: the one loaded if any, else one in the transformers 5 layout."""
        if self.hf_config is not None:
            return dict(self.hf_config)
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM",
        }[self.model_type]
        if self.rope_local is not None:
            rope_parameters: dict[str, Any] = {
                "full_attention": self.rope.to_hf(),
                "sliding_attention": self.rope_local.to_hf(),
            }
        else:
            rope_parameters = self.rope.to_hf()
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": "float32",
        }
        if self.model_type in _GEMMA:
            out.update(
                hidden_activation=self.hidden_act,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
            )
        else:
            out["hidden_act"] = self.hidden_act
        if self.model_type == "qwen2":
            out.pop("attention_bias")
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = "sliding_attention" in self.layer_types
        return out


def _parse_rope(hf: Mapping[str, Any], model_type: str) -> tuple[RopeConfig, RopeConfig | None]:
    params = hf.get("rope_parameters")
    if params:
        if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3)
            full = _rope_from(params.get("full_attention") or {}, default_theta=10000.0)
            local = params.get("sliding_attention")
            return full, (_rope_from(local, default_theta=10000.0) if local else None)
        return _rope_from(params, default_theta=10000.0), None
    # transformers 4.x: rope_theta + rope_scaling (scaling applies to global layers only in Gemma 3)
    theta = float(hf.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or {})
    full = _rope_from({**scaling, "rope_theta": theta}, default_theta=theta)
    local = None
    if model_type == "gemma3_text":
        local = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    return full, local


def _rope_from(d: Mapping[str, Any], *, default_theta: float) -> RopeConfig:
    rope_type = d.get("rope_type") or d.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    kwargs: dict[str, Any] = {"theta": float(d.get("rope_theta", default_theta)), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(d["factor"])
    if rope_type == "llama3":
        kwargs.update(
            low_freq_factor=float(d["low_freq_factor"]),
            high_freq_factor=float(d["high_freq_factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
        )
    return RopeConfig(**kwargs)


def _parse_layer_types(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if model_type == "gemma2":  # alternate, starting with a sliding layer
        return tuple(
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        )
    if model_type == "gemma3_text":  # layer i is global when (i + 1) % pattern == 0
        pattern = int(hf.get("sliding_window_pattern", 6))
        return tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        )
    if (
        model_type in ("qwen2", "qwen3")
        and hf.get("use_sliding_window")
        and hf.get("sliding_window")
    ):
        start = int(hf.get("max_window_layers", num_layers))
        return tuple(
            "sliding_attention" if i >= start else "full_attention" for i in range(num_layers)
        )
    return ("full_attention",) * num_layers


BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    # Llama-style, for local runs and tests: ~0.1M parameters plus the embeddings.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    ),
    # A student for the distillation quickstart: a quarter of tiny's parameters (embeddings aside).
    "micro": dict(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    ),
    "small": dict(
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
    ),
}


def builtin_config(name: str = "tiny", *, vocab_size: int = 384, **overrides: Any) -> ModelConfig:
    """A small Llama-style config (random init) for local runs; ``vocab_size`` matches your tokenizer."""
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"builtin config {name!r} unknown; known: {sorted(BUILTIN_CONFIGS)}")
    fields: dict[str, Any] = dict(
        model_type="llama",
        vocab_size=vocab_size,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        **BUILTIN_CONFIGS[name],
    )
    fields.update(overrides)
    return ModelConfig(**fields)
