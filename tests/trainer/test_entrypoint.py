"""`python -m posttrain.trainer` and `posttrain run` as a user starts them: real processes."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from posttrain.api.v1alpha1 import ALGORITHMS
from posttrain.trainer import algorithms

_spec = importlib.util.spec_from_file_location(
    "loop_jobs", os.path.join(os.path.dirname(__file__), "loop_jobs.py")
)
jobs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs)

POSTTRAIN = [sys.executable, "-m", "posttrain.cli"]


def test_unbuilt_algorithm_fails_fast_before_jax(tmp_path):
    # Every algorithm the API accepts is built today; an image older than the API would lack
    # one. Simulate that trainer by dropping DPO from its registry (a fault we cannot build).
    name = "dpo"
    recipe = jobs.write_recipe(tmp_path, algorithm=name)
    code = (
        "import sys\n"
        "from posttrain.trainer import algorithms\n"
        f"del algorithms.REGISTRY[{name!r}]\n"
        "from posttrain.trainer.__main__ import main\n"
        f"rc = main(['--recipe', {recipe!r}, '--output', {str(tmp_path / 'out')!r}])\n"
        "assert 'jax' not in sys.modules, 'jax was imported'\n"
        "sys.exit(rc)\n"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr  # runtime.EXIT_CONFIG
    assert f"spec.algorithm: {name!r} is not built" in proc.stderr
    assert "built: sft" in proc.stderr
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out").exists()


def test_every_algorithm_the_api_accepts_is_built():
    assert set(algorithms.built()) == set(ALGORITHMS)


def test_two_processes_give_the_losses_of_one(tmp_path):
    recipe = jobs.write_recipe(tmp_path, training={"steps": 4}, data={"eval": None})
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        proc = subprocess.run(
            [*POSTTRAIN, "run", recipe, "--output", str(out), "--processes", str(n)],
            capture_output=True,
            text=True,
            timeout=300,
            env=jobs.subprocess_env(),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # One job, not two copies: only one process was rank 0, so each step is logged once
    # (jobs.losses refuses a step logged twice; two unjoined processes would both append).
    a, b = jobs.losses(one), jobs.losses(two)
    assert len(jobs.metrics(two)) == len(jobs.metrics(one))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=2e-5)
    assert (two / "final" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_exits_zero_and_the_rerun_continues(tmp_path, processes):
    steps = (
        3000 if processes == 1 else 400
    )  # two CPU processes step ~10x slower (gloo, sync points)
    recipe = jobs.write_recipe(
        tmp_path,
        data={"eval": None},
        training={
            "steps": steps,
            "logEverySteps": 10,
            "checkpoint": {"everySteps": 100000, "keep": 2},
        },
    )
    out = tmp_path / "out"
    # with 2 processes the launcher forwards SIGTERM and JAX picks one step for both to stop at
    cmd = [*POSTTRAIN, "run", recipe, "--output", str(out), "--processes", str(processes)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=jobs.subprocess_env()
    )
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert time.time() - sent < 60
    saved = sorted(int(p) for p in os.listdir(out / "checkpoints") if p.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < steps, output
    assert "checkpoint saved" in output
    assert not (out / "final").exists()

    rerun = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=jobs.subprocess_env()
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from checkpoint step {saved[0]}" in rerun.stdout
    logged = [r["step"] for r in jobs.metrics(out) if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # continued, nothing repeated
    assert (out / "final" / "model.safetensors").exists()
