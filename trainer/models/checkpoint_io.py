"""Load and save Hugging Face checkpoints: config.json + model.safetensors (or a sharded index).

Loading streams: the model is first built abstract (``nnx.eval_shape``, no memory), then each
tensor is read from the memory-mapped safetensors file, transposed/cast and placed on its
device(s) one at a time, so the host never holds two copies of the weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from posttrain.trainer import storage
from posttrain.trainer.models.config import GENERATION_CONFIG_FILE, ModelConfig
from posttrain.trainer.models.sharding import LOGICAL_AXIS_RULES, logical_to_spec
from posttrain.trainer.models.transformer import CausalLM

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that we derive instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    """HF tensor name of an NNX param path, and whether HF stores it transposed.

    ('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel') -> ('model.layers.0.self_attn.q_proj.weight', True)
    """
    *prefix, leaf = (str(p) for p in path)
    if leaf == "kernel":  # nnx.Linear [in, out]; torch Linear weight [out, in]
        return ".".join([*prefix, "weight"]), True
    if leaf in ("embedding", "weight"):
        return ".".join([*prefix, "weight"]), False
    if leaf == "bias":
        return ".".join([*prefix, "bias"]), False
    raise ValueError(
        f"parameter {'.'.join(str(p) for p in path)} has no Hugging Face name "
        "(LoRA adapters must be merged into the base weights before save_pretrained)"
    )


def _base_params(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Variable]]:
    """(path, Param) for the model's own weights; LoRA params are not part of the HF format."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam):
            yield path, var


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    rngs: nnx.Rngs | None = None,
    mesh: Mesh | None = None,
    rules=LOGICAL_AXIS_RULES,
) -> CausalLM:
    """Load a HF causal LM from a local folder, ``gs://bucket/dir`` or ``hf://org/name``.

    The model computes in ``dtype``; weights are cast to ``param_dtype`` (default: ``dtype``).
    With ``mesh``, each parameter is placed sharded per ``rules``.
    ``rngs`` is accepted for symmetry with ``create_model``; loading draws no random numbers.
    """
    del rngs
    local = storage.local_path(str(path), allow_patterns=("*.json", "*.safetensors"))
    config_path = os.path.join(local, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}")
    config = ModelConfig.from_json_file(config_path)
    model = nnx.eval_shape(
        lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    load_weights(model, local, mesh=mesh, rules=rules, source=str(path))
    return model


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(path: str | os.PathLike) -> str | None:
    """The dtype a HF checkpoint stores its weights in (its first tensor's), or None if not a
    float32/bfloat16/float16 one. Reads only the safetensors header."""
    local = storage.local_path(str(path), allow_patterns=("*.json", "*.safetensors"))
    file = next(iter(_weight_files(local).values()))
    with safe_open(file, framework="numpy") as f:
        first = next(iter(f.keys()))
        return SAFETENSORS_DTYPES.get(f.get_slice(first).get_dtype())


def _weight_files(folder: str) -> dict[str, str]:
    """HF tensor name -> the file holding it."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder}: neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)


def load_weights(
    model: CausalLM,
    folder: str,
    *,
    mesh: Mesh | None = None,
    rules=LOGICAL_AXIS_RULES,
    source: str | None = None,
) -> None:
    """Fill every Param of ``model`` (abstract or concrete) from the safetensors in ``folder``."""
    source = source or folder
    files = _weight_files(folder)
    wanted = {}  # HF name -> (param, transpose)
    for p, var in _base_params(model):
        name, transpose = hf_name(p)
        wanted[name] = (var, transpose)
    missing = sorted(set(wanted) - set(files))
    if missing:
        shapes = ", ".join(f"{n} {tuple(_hf_shape(*wanted[n]))}" for n in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"{source}: checkpoint lacks tensors the config needs: {shapes}{more}")
    unexpected = sorted(
        n
        for n in set(files) - set(wanted)
        if not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and model.config.tie_word_embeddings)
    )
    if unexpected:
        log.warning(
            "%s: ignoring %d tensors the model does not use: %s",
            source,
            len(unexpected),
            unexpected[:10],
        )

    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    cpu = jax.local_devices(backend="cpu")[0]
    for file, names in by_file.items():
        # framework="flax" reads every dtype (numpy has no bfloat16); pin those reads to host memory.
        with jax.default_device(cpu), safe_open(file, framework="flax") as f:
            for name in names:
                var, transpose = wanted[name]
                expected = _hf_shape(var, transpose)
                got = tuple(f.get_slice(name).get_shape())
                if got != expected:
                    raise ValueError(
                        f"{source}: tensor {name} has shape {got}, the config needs {expected}"
                    )
                host = np.asarray(f.get_tensor(name))
                # A transposed view, copied only when the dtype changes; device_put makes the one copy.
                host = np.asarray(host.T if transpose else host, dtype=var.dtype)
                var.set_value(_place(host, var, mesh, rules))
                del host


def _hf_shape(var: nnx.Variable, transpose: bool) -> tuple[int, ...]:
    shape = tuple(var.shape)
    return shape[::-1] if transpose else shape


def _place(host: np.ndarray, var: nnx.Variable, mesh: Mesh | None, rules) -> jax.Array:
    if mesh is None:
        return jax.device_put(host)
    axes = var.get_metadata().get("logical_axes")
    spec = logical_to_spec(axes, host.shape, mesh, rules) if axes else jax.sharding.PartitionSpec()
    sharding = NamedSharding(mesh, spec)
    # Each device (on every host) copies just its slice of the host array.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def generation_config(config: ModelConfig) -> dict[str, Any]:
    """generation_config.json for an export: every EOS id (``config.eos_token_ids``: the loaded
    generation config's, then config.json's), with the BOS and pad ids; {} without EOS ids."""
    eos = list(config.eos_token_ids)
    if not eos:
        return {}
    out: dict[str, Any] = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    if config.bos_token_id is not None:
        out["bos_token_id"] = config.bos_token_id
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out


def save_pretrained(model: CausalLM, path: str | os.PathLike, *, dtype: Any = None) -> None:
    """Write config.json + model.safetensors (HF layout) to a folder or ``gs://``, and
    generation_config.json with every EOS id (``generation_config``).

    Tensors are written in ``dtype`` (default: each param's own dtype), cast from the params
    (e.g. float32 master weights -> bfloat16), and config.json records that dtype.
    Every process must call it (parameters sharded across hosts are gathered); process 0 writes.
    """
    adapters = [
        ".".join(map(str, p)) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.LoRAParam)
    ]
    if adapters:
        raise ValueError(
            f"save_pretrained writes base weights only, but the model has LoRA parameters ({adapters[0]}, ...); "
            "merge the adapters into the kernels first, or save the adapters with the training checkpoint"
        )
    tensors: dict[str, np.ndarray] = {}
    for p, var in _base_params(model):
        name, transpose = hf_name(p)
        value = var.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        host = np.asarray(jax.device_get(value))
        if dtype is not None:
            host = host.astype(jnp.dtype(dtype))
        tensors[name] = np.ascontiguousarray(host.T if transpose else host)
    if jax.process_index() != 0:
        return
    hf_config = model.config.to_hf()
    written = {str(t.dtype) for t in tensors.values()}
    if len(written) == 1:  # transformers reads the dtype to load in from here (4.x: torch_dtype)
        dtype_name = written.pop()
        for key in [k for k in ("dtype", "torch_dtype") if k in hf_config] or ["dtype"]:
            hf_config[key] = dtype_name
    config_json = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    with storage.writable_dir(str(path)) as local:
        # metadata format=pt: transformers refuses files without it.
        save_file(tensors, os.path.join(local, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(local, CONFIG_FILE), "w") as f:
            f.write(config_json)
        generation = generation_config(model.config)
        if generation:  # every EOS id, so an export stops where the model it came from did
            with open(os.path.join(local, GENERATION_CONFIG_FILE), "w") as f:
                f.write(json.dumps(generation, indent=2, sort_keys=True) + "\n")
