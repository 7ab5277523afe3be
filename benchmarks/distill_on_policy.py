"""On-policy against off-policy distillation on the built-in models, the same steps each.

    .venv/bin/python -P benchmarks/distill_on_policy.py --teacher /tmp/sft-quickstart/final

Runs ``examples/local/distill-on-policy-quickstart.yaml`` (every step on the student's own
samples, generalised JSD at beta 1 = reverse KL) and its off-policy twin (``onPolicy: false``,
the same loss on the dataset's completions), then measures each student's reverse KL to the
teacher on the held-out prompts: the student samples ``--samples`` completions per prompt at
temperature 1 and the figure is KL(student || teacher) of the next-token distributions, summed
over the vocabulary and averaged over the sampled tokens (EOS included). The untrained student's
figure is printed too. Prints one JSON line per run and writes them to ``--out``/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

from posttrain.api import parse_job  # noqa: E402
from posttrain.api.v1alpha1 import ModelSpec  # noqa: E402
from posttrain.trainer.loop import build_model, load_tokenizer, train  # noqa: E402
from posttrain.trainer.models import make_mesh  # noqa: E402
from posttrain.trainer.sampling import generate  # noqa: E402

EXAMPLE = ROOT / "examples" / "local" / "distill-on-policy-quickstart.yaml"


def reverse_kl(student, teacher, tok, prompts: list[str], samples: int, seed: int) -> float:
    """Mean over the student's sampled tokens of KL(q_student || p_teacher) (full vocabulary)."""
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
    ids = [bos + tok.encode(p) for p in prompts for _ in range(samples)]
    gen = generate(
        student,
        ids,
        8,
        temperature=1.0,
        eos_id=tok.eos_token_id,
        seed=seed,
        pad_id=tok.pad_token_id,
    )
    tokens, mask = np.asarray(gen.tokens), np.asarray(gen.mask)
    L = max(len(p) for p in ids) + tokens.shape[1]
    seqs = np.full((len(ids), L), tok.pad_token_id, np.int32)
    att = np.zeros((len(ids), L), np.int32)
    weight = np.zeros((len(ids), L), np.float32)  # position t predicts a sampled token
    for i, p in enumerate(ids):
        new = tokens[i][mask[i]].tolist()
        seq = p + new
        seqs[i, : len(seq)] = seq
        att[i, : len(seq)] = 1
        weight[i, len(p) - 1 : len(p) - 1 + len(new)] = 1.0
    x, m = jnp.asarray(seqs), jnp.asarray(att)
    log_q = jax.nn.log_softmax(student(x, m).astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(teacher(x, m).astype(jnp.float32), axis=-1)
    kl = np.asarray(jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1))
    return float((kl * weight).sum() / weight.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="/tmp/sft-quickstart/final")
    ap.add_argument("--steps", type=int, default=None, help="default: the example's")
    ap.add_argument("--seed", type=int, default=None, help="training.seed (default: the example's)")
    ap.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    ap.add_argument("--out", default="/tmp/distill-on-policy-bench")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["distill"]["teacher"] = args.teacher
    if args.steps:
        doc["spec"]["training"]["steps"] = args.steps
    if args.seed is not None:
        doc["spec"]["training"]["seed"] = args.seed
    test = ROOT / doc["spec"]["data"]["eval"]
    prompts = [json.loads(line)["prompt"] for line in test.read_text().splitlines()]
    student_spec = ModelSpec(base=doc["spec"]["model"]["base"], dtype="float32")
    tok = load_tokenizer(student_spec)
    mesh = make_mesh()
    teacher = build_model(ModelSpec(base=args.teacher, dtype="float32"), tok, mesh, seed=0)
    seed = doc["spec"]["training"].get("seed", 0)
    untrained = build_model(student_spec, tok, mesh, seed=seed)
    results = [
        {
            "run": "untrained student",
            "reverse_kl": reverse_kl(untrained, teacher, tok, prompts, args.samples, 7),
        }  # fmt: skip
    ]
    print(json.dumps(results[0]), flush=True)
    for on_policy in (True, False):
        name = "on-policy" if on_policy else "off-policy"
        d = json.loads(json.dumps(doc))
        d["spec"]["distill"]["onPolicy"] = on_policy
        if not on_policy:
            d["spec"]["distill"].pop("lmbda")
        d["spec"]["data"]["train"] = str(ROOT / d["spec"]["data"]["train"])
        d["spec"]["data"]["eval"] = str(test)
        job = parse_job(d)
        run_dir = out / name
        start = time.perf_counter()
        train(job, str(run_dir), say=lambda _m: None, progress_bar=False)
        seconds = time.perf_counter() - start
        student = build_model(ModelSpec(base=str(run_dir / "final"), dtype="float32"), tok, mesh, 0)
        record = {
            "run": name,
            "steps": job.spec.training.steps,
            "reverse_kl": reverse_kl(student, teacher, tok, prompts, args.samples, 7),
            "train_seconds": round(seconds, 1),
        }
        results.append(record)
        print(json.dumps(record), flush=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
