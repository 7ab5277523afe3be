"""Async RL with real processes (issue #24): a trainer and a rollout worker talking HTTP over
loopback, as `posttrain run` starts them and as pods would. Faults are real: processes are
killed (SIGKILL) and preempted (SIGTERM) mid-run and started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from posttrain import runtime
from posttrain.commands.run import free_port
from posttrain.trainer.tasks import arithmetic

sys.path.insert(0, str(Path(__file__).parent))
from loop_jobs import COMPILE_CACHE_ENV  # noqa: E402

REWARDS = textwrap.dedent(
    """
    def digits(prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("async24")
    arithmetic.write_jsonl(str(root / "train.jsonl"), arithmetic.problems("train")[:128])
    (root / "my_rewards.py").write_text(REWARDS)
    return root


def job_file(files: Path, folder: Path, steps: int, **rollout) -> Path:
    m = {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainJob",
        "metadata": {"name": "async24"},
        "spec": {
            "algorithm": "grpo",
            "model": {"base": "builtin:tiny", "dtype": "float32"},
            "data": {"train": str(files / "train.jsonl"), "maxLength": 16, "maxPromptLength": 8},
            "grpo": {
                "numGenerations": 4,
                "maxNewTokens": 6,
                "beta": 0.0,
                "rewards": [{"function": f"{files}/my_rewards.py:digits"}],
            },
            "training": {
                "steps": steps,
                "batchSize": 4,
                "learningRate": 1e-2,
                "schedule": {"name": "constant", "warmupSteps": 0},
                "logEverySteps": 1,
                "checkpoint": {"everySteps": 2, "keep": 2},
            },
            "output": {"export": False},
            "resources": {"accelerator": "cpu"},
            "rollout": {"mode": "async", **rollout},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def per_step(out: Path) -> dict[int, dict]:
    """Each step's records merged, later ones winning (a resumed run logs the steps after its
    checkpoint again; the final metrics are a record of their own)."""
    steps: dict[int, dict] = {}
    path = out / "metrics.jsonl"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            steps.setdefault(m["step"], {}).update(m)
    return steps


def check_every_prompt_once(steps: dict[int, dict], total: int, lag: int) -> None:
    """Step s trained on rollout batch s - 1 (one step per batch): none lost, none twice, and
    each sampled by a version at most `lag` behind."""
    assert sorted(steps) == list(range(1, total + 1))
    assert [int(steps[s]["rollout_index"]) for s in range(1, total + 1)] == list(range(total))
    for s in range(1, total + 1):
        sampled = steps[s]["policy_version_sampled"]
        assert 0 <= (s - 1) - sampled <= lag, (s, sampled)
        assert steps[s]["policy_lag"] == (s - 1) - sampled


def env_for(role: str, address: str, worker: int = 0) -> dict[str, str]:
    env = {**os.environ, **COMPILE_CACHE_ENV, runtime.TRAINER_ADDRESS: address}
    env[runtime.ROLE] = role
    env["POSTTRAIN_ROLLOUT_WAIT_NOTICE_S"] = "2"
    if role == runtime.ROLE_ROLLOUT:
        env[runtime.ROLLOUT_WORKER] = str(worker)
    return env


class Role:
    """One process of the job, its output in a file (read while it runs)."""

    def __init__(self, job: Path, out: Path, role: str, address: str, log: Path):
        self.log = log
        self.file = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "posttrain.trainer", "--recipe", str(job),
             "--output", str(out)],
            env=env_for(role, address),
            stdout=self.file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.file.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.file.close()


class Roles:
    """The processes of one job (its trainer and worker, each started again as tests need),
    each with its own numbered log under DIR/logs."""

    def __init__(self, job: Path, tmp_path: Path):
        self.job, self.out = job, tmp_path / "out"
        self.address = f"127.0.0.1:{free_port()}"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.started: list[Role] = []

    def start(self, role: str) -> Role:
        n = 1 + sum(r.log.name.startswith(role) for r in self.started)
        r = Role(self.job, self.out, role, self.address, self.logs / f"{role}-{n}.log")
        self.started.append(r)
        return r

    def stop(self) -> None:
        for r in self.started:
            r.stop()


def wait_for(what, timeout: float, *roles: Role, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        for r in roles:
            assert r.proc.poll() is None, f"{r.log.name} exited {r.proc.returncode}:\n{r.text()}"
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout}s\n" + "\n".join(f"--- {r.log.name}\n{r.text()}" for r in roles)
    )


def test_posttrain_run_runs_the_roles_and_logs_staleness_and_weight_sync(files, tmp_path):
    job = job_file(files, tmp_path, steps=6, maxPolicyLag=1)
    _run_and_check(job, tmp_path, steps=6, batches=6)


def test_ppo_runs_async_too(files, tmp_path):
    # PPO: two mini-batches per rollout batch, so batch i is trained at steps 2i + 1 and 2i + 2.
    job = job_file(files, tmp_path, steps=4, maxPolicyLag=1)
    m = yaml.safe_load(job.read_text())
    grpo = m["spec"].pop("grpo")
    m["spec"]["algorithm"] = "ppo"
    m["spec"]["ppo"] = {
        "maxNewTokens": grpo["maxNewTokens"],
        "rewards": grpo["rewards"],
        "numMiniBatches": 2,
        "numIterations": 1,
        "klCoef": 0.0,
    }
    job.write_text(yaml.safe_dump(m))
    _run_and_check(job, tmp_path, steps=4, batches=2)


def _run_and_check(job: Path, tmp_path: Path, steps: int, batches: int) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "posttrain.cli", "run", str(job), "--output", str(out)],
        env={**os.environ, **COMPILE_CACHE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "rollout service on port" in proc.stdout
    assert "rollout worker 0: the trainer is done" in proc.stdout
    got = per_step(out)
    if batches == steps:
        check_every_prompt_once(got, steps, lag=1)
    else:  # several steps per rollout batch: each batch on its own run of steps, in order
        per_batch = steps // batches
        assert [int(got[s]["rollout_index"]) for s in sorted(got)] == [
            (s - 1) // per_batch for s in sorted(got)
        ]
    assert all(got[s]["weight_sync_seconds"] > 0 for s in got)
    assert all(got[s]["weight_sync_bytes"] > 0 for s in got)
    assert all(got[s]["rollout_tokens_per_second"] > 0 for s in got)
    assert 0 <= got[steps]["staleness_mean"] <= 1
    # TIS is on by default (lag 1) and logs its weights: the sampler is the policy, nearly.
    assert all(abs(got[s]["rollout_is_mean"] - 1.0) < 0.1 for s in got)


def test_killed_worker_and_killed_trainer_resume_with_no_prompt_lost_or_trained_twice(
    files, tmp_path
):
    total = 14
    roles = Roles(job_file(files, tmp_path, steps=total, maxPolicyLag=1), tmp_path)
    out = roles.out
    trainer, worker = roles.start(runtime.ROLE_TRAINER), roles.start(runtime.ROLE_ROLLOUT)
    try:
        # 1. The rollout worker is killed mid-run: the trainer waits and says so, once.
        wait_for(lambda: max(per_step(out), default=0) >= 3, 300, trainer, worker)
        worker.proc.kill()
        worker.wait(30)
        line = wait_for(
            lambda: [x for x in trainer.text().splitlines() if "waiting" in x and "rollout" in x],
            120,
            trainer,
        )
        assert len(line) == 1 and "rollout worker 0" in line[0], line
        time.sleep(3)
        assert trainer.proc.poll() is None
        assert len([x for x in trainer.text().splitlines() if x.startswith("waiting")]) == 1
        stalled = max(per_step(out))
        # It comes back and fetches the current weights (not version 0).
        worker = roles.start(runtime.ROLE_ROLLOUT)
        wait_for(lambda: max(per_step(out)) >= stalled + 3, 300, trainer, worker)
        assert per_step(out)[stalled + 1]["policy_version_sampled"] >= stalled - 1

        # 2. The trainer is killed (no checkpoint at the moment of death): the worker waits.
        trainer.proc.kill()
        trainer.wait(30)
        wait_for(lambda: "unreachable" in worker.text(), 60, worker)
        time.sleep(2)
        assert worker.proc.poll() is None  # it waits for its trainer
        trainer = roles.start(runtime.ROLE_TRAINER)
        assert trainer.wait(600) == 0, trainer.text()
        assert "resumed from checkpoint step" in trainer.text()
        assert worker.wait(60) == 0, worker.text()
        assert "trainer reachable again" in worker.text()
        assert "the trainer is done" in worker.text()
    finally:
        roles.stop()
    check_every_prompt_once(per_step(out), total, lag=1)


def test_a_preempted_trainer_saves_and_resumes(files, tmp_path):
    """SIGTERM (a preemption) stops the trainer at a step with a checkpoint; started again, it
    continues from that step while its worker, which waited, serves it."""
    total = 8
    roles = Roles(job_file(files, tmp_path, steps=total, maxPolicyLag=2), tmp_path)
    out = roles.out
    trainer, worker = roles.start(runtime.ROLE_TRAINER), roles.start(runtime.ROLE_ROLLOUT)
    try:
        wait_for(lambda: max(per_step(out), default=0) >= 3, 300, trainer, worker)
        trainer.proc.send_signal(signal.SIGTERM)
        assert trainer.wait(120) == 0, trainer.text()
        stopped = int(trainer.text().split("stopping at step ")[1].split(":")[0])
        assert stopped < total
        wait_for(lambda: "unreachable" in worker.text(), 60, worker)
        assert worker.proc.poll() is None  # not told the run is done: it waits
        trainer = roles.start(runtime.ROLE_TRAINER)
        assert trainer.wait(600) == 0, trainer.text()
        assert f"resumed from checkpoint step {stopped}" in trainer.text()
        assert worker.wait(60) == 0, worker.text()
    finally:
        roles.stop()
    check_every_prompt_once(per_step(out), total, lag=2)
