"""Batch geometry against the devices a job asks for: what the trainer would refuse at run time,
found from the spec alone, before any chip is held.

    check_geometry(spec)    raises FieldValueError(field, message); `field` is the full path
                            (`spec.training.batchSize`) of the field to change

The trainer (trainer/loop.py `_check_rows`, `make_mesh`) splits each step's rows into
batchSize / microBatchSize micro-batches and shards every micro-batch over the data-parallel
devices (mesh data x fsdp). So, with

    devices         TPU: chips of the topology x slices; GPU: nodes x gpusPerNode;
                    cpu: nodes x the --xla_force_host_platform_device_count of spec.env XLA_FLAGS (else 1)
    mesh            spec.training.mesh, its -1 axis resolved against the devices
    data-parallel   mesh data x fsdp (= devices / tensor)
    rows per step   batchSize x numGenerations (GRPO family: completions), else batchSize
                    (SFT/distill sequences, DPO/ORPO pairs, PPO completions of one mini-batch)
    micro-batch     microBatchSize (default batchSize) x numGenerations rows

the checks are, in order: the mesh fits the devices, microBatchSize divides batchSize, and a
micro-batch's rows divide over the data-parallel devices. Chips per host are checked by the
resources model itself (`spec.resources.chipsPerHost`). Sync rollouts (the default) run on the
training mesh, on whole steps' rows, so they divide when the micro-batches do; async rollouts
(`spec.rollout.mode: async`) run on rollout workers of their own role, one host each, outside
the training mesh, and are not checked here.

Pure (no I/O, no JAX); reads the algorithm's settings generically (`spec.settings`), so it does not
depend on how the per-algorithm settings are laid out.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

from posttrain.api import accelerators as acc
from posttrain.api.v1alpha1 import FieldValueError

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


@dataclass(frozen=True)
class Geometry:
    devices: int
    data: int
    fsdp: int
    tensor: int
    rows_per_step: int
    rows_per_micro: int
    num_micro: int

    @property
    def data_parallel(self) -> int:
        return self.data * self.fsdp


def device_count(spec: Any) -> tuple[int, str]:
    """(devices, how they were counted) for `spec.resources`."""
    r = spec.resources
    if acc.is_tpu(r.accelerator):
        chips = acc.topology_chips(r.topology)
        if r.slices > 1:
            return (
                chips * r.slices,
                f"{r.slices} slices of {r.accelerator} {r.topology}, {chips} chips each",
            )
        return chips, f"{r.accelerator} {r.topology}: {chips} chips"
    if acc.is_gpu(r.accelerator):
        gpus = r.gpus_per_node or 8
        return r.nodes * gpus, f"{r.nodes} node(s) x {gpus} GPUs"
    per_node = 1
    for var in getattr(spec, "env", None) or []:
        if var.name == "XLA_FLAGS" and var.value:
            for flag in shlex.split(var.value):
                m = _DEVICE_COUNT.fullmatch(flag)
                if m:
                    per_node = max(1, int(m[1]))
    what = f"{r.nodes} cpu node(s)" + (f" x {per_node} XLA devices" if per_node > 1 else "")
    return r.nodes * per_node, what


def _setting(spec: Any, name: str) -> int:
    """An algorithm setting that multiplies rows (numGenerations), 1 when the algorithm has
    none. Read from the algorithm's settings (its block, or its settings type's defaults)."""
    value = getattr(getattr(spec, "settings", None), name, None)
    return 1 if value is None else int(value)


def _block_name(spec: Any) -> str:
    """The YAML name of the algorithm's block (``dr-grpo`` reads ``drGrpo``)."""
    from posttrain.api.algorithms import REGISTRY

    entry = REGISTRY.get(spec.algorithm)
    return entry.block if entry is not None else spec.algorithm


def geometry(spec: Any) -> Geometry:
    """The job's geometry; raises FieldValueError for a mesh that does not fit its devices."""
    devices, counted = device_count(spec)
    m = spec.training.mesh
    sizes = [m.data, m.fsdp, m.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise FieldValueError(
                "spec.training.mesh",
                f"data={m.data} fsdp={m.fsdp} tensor={m.tensor} does not divide the {devices} "
                f"devices of spec.resources ({counted})",
            )
        sizes[sizes.index(-1)] = devices // known
    elif known != devices:
        raise FieldValueError(
            "spec.training.mesh",
            f"data={m.data} fsdp={m.fsdp} tensor={m.tensor} needs {known} devices; "
            f"spec.resources has {devices} ({counted})",
        )
    t = spec.training
    per_row = _setting(spec, "num_generations")
    micro = t.micro_batch_size or t.batch_size
    return Geometry(
        devices=devices,
        data=sizes[0],
        fsdp=sizes[1],
        tensor=sizes[2],
        rows_per_step=t.batch_size * per_row,
        rows_per_micro=micro * per_row,
        num_micro=t.batch_size // micro if t.batch_size % micro == 0 else 0,
    )


def check_geometry(spec: Any) -> None:
    """Refuse what the trainer would refuse at its first step (see the module docstring)."""
    t = spec.training
    mb = t.micro_batch_size
    if mb is not None and t.batch_size % mb:
        raise FieldValueError(
            "spec.training.microBatchSize",
            f"batchSize ({t.batch_size}) must be a multiple of microBatchSize ({mb})",
        )
    g = geometry(spec)
    dp = g.data_parallel
    if g.rows_per_micro % dp == 0:
        return
    devices, counted = device_count(spec)
    per_row = _setting(spec, "num_generations")
    block = _block_name(spec)
    rows = f"batchSize {t.batch_size}"
    if per_row > 1:
        rows += f" x {block}.numGenerations {per_row} = {g.rows_per_step} rows"
    tensor = f" / mesh tensor {g.tensor}" if g.tensor > 1 else ""
    where = f"the {dp} data-parallel devices ({counted}{tensor}; mesh data x fsdp)"
    if mb is None or mb == t.batch_size:
        unit = per_row if per_row > 1 else 1
        need = dp // math.gcd(dp, unit)
        raise FieldValueError(
            "spec.training.batchSize",
            f"a step's {rows} does not divide over {where}: make batchSize a multiple of {need}",
        )
    need = dp // math.gcd(dp, per_row)
    raise FieldValueError(
        "spec.training.microBatchSize",
        f"{rows} in micro-batches of {mb}"
        + (f" x {per_row} = {g.rows_per_micro} rows" if per_row > 1 else "")
        + f": a micro-batch does not divide over {where}: make microBatchSize a multiple of {need}",
    )
