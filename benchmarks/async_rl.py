"""The same GRPO job sync and async (1 trainer + 1 rollout worker, maxPolicyLag 1), alternating.

    .venv/bin/python -P benchmarks/async_rl.py                # 2 rounds: sync, async, sync, async
    .venv/bin/python -P benchmarks/async_rl.py --rounds 3 --steps 40

The job: the built-in small model on the arithmetic prompts, 16 prompts x 8 completions of up to
``--new-tokens`` (16) tokens, from scratch with a dense digit-share reward (so the reward rises
within the run either way); ``--warmup-steps N`` starts both from one shared SFT warm-up instead,
with the task's own reward (its answers are ~3 tokens: sampling is a smaller share). Each run is
``posttrain run`` in a fresh process: sync one process, async its two roles (two processes, the
worker at a lower CPU priority, talking HTTP over loopback, the transport pods use).

Figures, from each run's metrics.jsonl:
  sync_step_s / async_step_s   median wall seconds per RL step (``step_seconds``), after the
                               first ``--skip`` steps (compilation), median over rounds
  speedup                      sync_step_s / async_step_s
  reward_sync / reward_async   mean ``reward_mean`` of the last ``--tail`` steps, mean over rounds
  weight_sync_s                median seconds a worker took to fetch, check and swap in a version
  staleness_mean               mean policy lag of the batches the async trainer trained on
  rollout_share, overlap_bound sampling's share of a sync step, and 1 / max(share, 1 - share):
                               the speedup perfect overlap of the two could give
The last line printed is one JSON object with these keys (and the per-round figures). Absolute
figures drift between runs on a shared machine; compare ratios taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "local" / "data" / "arithmetic"


def warmup_job(steps: int) -> dict:
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": "async-bench-warmup"},
        "spec": {
            "algorithm": "sft",
            "model": {"base": "builtin:small", "dtype": "float32"},
            "data": {
                "train": str(DATA / "train.jsonl"),
                "maxLength": 16,
                "maxPromptLength": 8,
            },
            "training": {
                "steps": steps,
                "batchSize": 32,
                "learningRate": 3.0e-4,
                "schedule": {"name": "linear", "warmupSteps": 10, "minRatio": 0.3},
                "logEverySteps": 50,
                "checkpoint": {"everySteps": steps},
            },
            "resources": {"accelerator": "cpu"},
        },
    }


DIGITS = """
def digits(prompts, completions, **columns):
    # Dense and learnable from scratch: the share of digits in the completion.
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
"""


def grpo_job(base: str, steps: int, batch: int, mode: str, work: Path, new_tokens: int) -> dict:
    if base.startswith("builtin:"):  # from scratch: the dense digit-share reward
        (work / "digits.py").write_text(DIGITS)
        reward, learning_rate = {"function": f"{work}/digits.py:digits"}, 1e-3
    else:  # after the SFT warm-up: the task's own reward
        reward, learning_rate = {"builtin": "math-answer", "answerField": "answer"}, 5e-5
    job = {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": f"async-bench-{mode}"},
        "spec": {
            "algorithm": "grpo",
            "model": {"base": base, "dtype": "float32"},
            "data": {
                "train": str(DATA / "train.jsonl"),
                "maxLength": 8 + new_tokens,
                "maxPromptLength": 8,
            },
            "grpo": {
                "numGenerations": 8,
                "beta": 0.0,
                "maxNewTokens": new_tokens,
                "rewards": [reward],
            },
            "training": {
                "steps": steps,
                "batchSize": batch,
                "learningRate": learning_rate,
                "logEverySteps": 1,
                "checkpoint": {"everySteps": 10 * steps},
            },
            "output": {"export": False},
            "resources": {"accelerator": "cpu"},
        },
    }
    if mode == "async":
        job["spec"]["rollout"] = {"mode": "async", "maxPolicyLag": 1, "replicas": 1}
    return job


def posttrain_run(job: dict, work: Path, name: str) -> list[dict]:
    path, out = work / f"{name}.yaml", work / name
    path.write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "posttrain.cli", "run", str(path), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.exit(
            f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    print(f"  {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def figures(records: list[dict], skip: int, tail: int, rows_per_step: int) -> dict[str, float]:
    steps = [r for r in records if r.get("step_seconds") is not None]
    rewards = [r["reward_mean"] for r in steps if r.get("reward_mean") is not None]
    timed = steps[skip:]
    out = {
        "step_s": statistics.median(r["step_seconds"] for r in timed),
        "reward": statistics.fmean(rewards[-tail:]),
        "reward_first": statistics.fmean(rewards[:tail]),
    }
    if all(r.get("generation_tokens_per_second") for r in timed):  # sync: generation's share
        rows = [
            r["completion_length"] * rows_per_step / r["generation_tokens_per_second"]
            for r in timed
        ]
        out["rollout_share"] = statistics.median(rows) / out["step_s"]
    syncs = [r["weight_sync_seconds"] for r in steps if r.get("weight_sync_seconds") is not None]
    if syncs:
        out["weight_sync_s"] = statistics.median(syncs)
        out["staleness_mean"] = steps[-1]["staleness_mean"]
        out["trainer_wait_s"] = statistics.median(r["trainer_wait_seconds"] for r in steps[skip:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="GRPO steps per run")
    p.add_argument("--batch", type=int, default=16, help="prompts per step (x 8 completions)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="0 (default): from scratch with the digit-share reward; N: a shared SFT warm-up of "
        "N steps, then the arithmetic task's own reward (math-answer, short answers)",
    )
    p.add_argument("--new-tokens", type=int, default=16, help="maxNewTokens (default 16)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--tail", type=int, default=10, help="last steps whose reward is averaged")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="posttrain-async-bench-") as tmp:
        work = Path(tmp)
        print(
            f"SFT warm-up ({args.warmup_steps} steps), then {args.rounds} rounds of sync and "
            f"async GRPO ({args.steps} steps, {args.batch} x 8 completions); {os.cpu_count()} "
            "cores",
            flush=True,
        )
        base = "builtin:small"
        if args.warmup_steps:
            posttrain_run(warmup_job(args.warmup_steps), work, "warmup")
            base = str(work / "warmup" / "final")
        runs: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
        for r in range(args.rounds):
            for mode in ("sync", "async"):
                records = posttrain_run(
                    grpo_job(base, args.steps, args.batch, mode, work, args.new_tokens),
                    work,
                    f"{mode}-{r}",
                )
                runs[mode].append(figures(records, args.skip, args.tail, args.batch * 8))
                print(f"    {json.dumps(runs[mode][-1])}", flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(f[key] for f in runs[mode])

    sync_s, async_s = med("sync", "step_s"), med("async", "step_s")
    share = med("sync", "rollout_share")
    result = {
        "sync_step_s": round(sync_s, 4),
        "async_step_s": round(async_s, 4),
        "speedup": round(sync_s / async_s, 3),
        "reward_sync": round(statistics.fmean(f["reward"] for f in runs["sync"]), 4),
        "reward_async": round(statistics.fmean(f["reward"] for f in runs["async"]), 4),
        "weight_sync_s": round(med("async", "weight_sync_s"), 4),
        "staleness_mean": round(statistics.fmean(f["staleness_mean"] for f in runs["async"]), 3),
        "reward_first_sync": round(statistics.fmean(f["reward_first"] for f in runs["sync"]), 4),
        "reward_first_async": round(statistics.fmean(f["reward_first"] for f in runs["async"]), 4),
        "trainer_wait_s": round(med("async", "trainer_wait_s"), 4),
        # Sampling's share of a sync step, and the speedup perfect overlap would give with as
        # many cores again (1 / the larger share); on a shared CPU the roles also share cores.
        "rollout_share": round(share, 3),
        "overlap_bound": round(1 / max(share, 1 - share), 3),
        "rounds": args.rounds,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "per_round": runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
