"""Decoder-only LMs in Flax NNX (Llama 3, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text) with HF checkpoint I/O."""

from posttrain.trainer.models.checkpoint_io import (
    checkpoint_dtype,
    hf_name,
    load_pretrained,
    load_weights,
    save_pretrained,
)
from posttrain.trainer.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    RopeConfig,
    builtin_config,
)
from posttrain.trainer.models.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_model,
)
from posttrain.trainer.models.transformer import (
    REMAT_POLICIES,
    CausalLM,
    KVCache,
    create_model,
    set_attention,
    set_remat,
    set_scan_layers,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "REMAT_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "builtin_config",
    "checkpoint_dtype",
    "create_model",
    "hf_name",
    "load_pretrained",
    "load_weights",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "save_pretrained",
    "set_attention",
    "set_remat",
    "set_scan_layers",
    "shard_model",
]
