"""The end-of-run report of the rollout algorithms: reward rise, held-out greedy reward, a plot."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from posttrain.trainer import storage
from posttrain.trainer.algorithms.base import Context


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def reward_summary(history: Sequence[Mapping[str, Any]], window: int = 10) -> dict[str, float]:
    """reward_mean averaged over the first and last `window` logged steps, and the rise."""
    values = [float(m["reward_mean"]) for m in history if m.get("reward_mean") is not None]
    if not values:
        return {}
    w = max(1, min(window, len(values) // 2 or 1))
    first, last = float(np.mean(values[:w])), float(np.mean(values[-w:]))
    return {"reward_first": first, "reward_last": last, "reward_rise": last - first}


def plot_rewards(history: Sequence[Mapping[str, Any]], path: str) -> str | None:
    """A PNG of reward_mean (and each reward term) over steps; None when nothing was logged."""
    rows = [m for m in history if m.get("reward_mean") is not None and "step" in m]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["reward_mean"] for m in rows], label="reward_mean", linewidth=2)
    terms = sorted({k for m in rows for k in m if k.startswith("reward/")})
    for key in terms if len(terms) > 1 else []:  # one term is the total again
        values = [np.nan if m.get(key) is None else m[key] for m in rows]
        ax.plot(steps, values, label=key, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path


def rl_finish(
    ctx: Context, evaluate: Callable[[Any], float] | None, eval_before: Callable[[], float | None]
) -> Callable[[Any], dict[str, float]]:
    """The ``finish`` of a rollout algorithm: reward summary from metrics.jsonl, greedy reward on
    data.eval before (``eval_before()``) and after RL (``evaluate(model)``), and reward.png."""

    def finish(model: Any) -> dict[str, float]:
        # Only rank 0 writes metrics.jsonl; other hosts may not see it (local disks).
        history = read_metrics(storage.join(ctx.output_dir, "metrics.jsonl")) if ctx.rank0 else []
        summary = reward_summary(history)
        if evaluate is not None:
            before = eval_before()
            if before is not None:
                summary["eval_reward_before"] = before
            summary["eval_reward_after"] = evaluate(model)
        if ctx.rank0:
            plotted = plot_rewards(history, storage.join(ctx.output_dir, "reward.png"))
            if plotted:
                ctx.log(f"reward plot: {plotted}")
        return summary

    return finish
