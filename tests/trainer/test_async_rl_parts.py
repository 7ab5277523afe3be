"""Async RL's parts without training processes (issue #24): the API's checks and defaults, the
schedule, the wire format, the weight transfer over a real socket (and one cut mid-body by a real
proxy), and TIS computed in the loss against the host-side TIS."""

from __future__ import annotations

import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from posttrain.api.load import JobInvalid, parse_job
from posttrain.trainer.async_rl import schedule, wire
from posttrain.trainer.async_rl.service import RolloutService, listen_address, named_leaves
from posttrain.trainer.async_rl.worker import HeldWeights, TrainerClient, sync


def quickstart(**rollout) -> dict:
    with open("examples/local/grpo-quickstart.yaml") as f:
        m = yaml.safe_load(f)
    if rollout:
        m["spec"]["rollout"] = rollout
    return m


# --------------------------------------------------------------------------- the API


def errors(m: dict) -> dict[str, str]:
    with pytest.raises(JobInvalid) as info:
        parse_job(m)
    return {e.path: e.message for e in info.value.errors}


def test_async_defaults_and_tis_on_when_the_lag_can_be_above_zero():
    job = parse_job(quickstart(mode="async"))
    role = job.spec.rollout_role
    assert (role.is_async, role.lag, role.workers) == (True, 1, 1)
    assert job.spec.settings.rollout_correction.importance_sampling == "token"
    # Lag 0: every batch is sampled by the weights it trains on: no correction added.
    job = parse_job(quickstart(mode="async", maxPolicyLag=0))
    assert job.spec.settings.rollout_correction.importance_sampling == "none"
    # A block that sets rolloutCorrection keeps what it says.
    m = quickstart(mode="async", maxPolicyLag=2)
    m["spec"]["grpo"]["rolloutCorrection"] = {"rejection": "sequence"}
    c = parse_job(m).spec.settings.rollout_correction
    assert (c.importance_sampling, c.rejection) == ("none", "sequence")
    # Sync (and no spec.rollout at all): nothing changes.
    assert parse_job(quickstart()).spec.rollout_role.lag == 0
    assert not parse_job(quickstart()).spec.settings.rollout_correction.enabled


def test_inconsistent_rollout_settings_name_the_field():
    assert "mode: async" in errors(quickstart(mode="sync", replicas=2))["spec.rollout.replicas"]
    assert "maxPolicyLag" in errors(quickstart(maxPolicyLag=1))["spec.rollout.maxPolicyLag"]
    two_hosts = {"accelerator": "cpu", "nodes": 2}
    msg = errors(quickstart(mode="async", resources=two_hosts))["spec.rollout.resources"]
    assert "one host" in msg and "replicas" in msg
    m = quickstart(mode="async")
    m["spec"]["resources"] = {"accelerator": "tpu-v5e", "topology": "4x4"}
    assert "one host" in errors(m)["spec.rollout.mode"]
    m = quickstart(mode="async")
    m["spec"]["algorithm"], m["spec"]["dapo"] = "dapo", m["spec"].pop("grpo")
    assert "dynamicSampling: false" in errors(m)["spec.rollout.mode"]
    m["spec"]["dapo"]["dynamicSampling"] = False
    assert parse_job(m).spec.rollout_role.is_async
    with open("examples/local/dpo-quickstart.yaml") as f:
        dpo = yaml.safe_load(f)
    dpo["spec"]["rollout"] = {"mode": "async"}
    assert "has none" in errors(dpo)["spec.rollout"]
    bad = quickstart(mode="later")
    assert "spec.rollout.mode" in errors(bad)


# --------------------------------------------------------------------------- the schedule


def test_schedule_shares_indices_and_bounds_the_lag():
    # Two workers: each its own residue class, from the index the trainer takes next.
    assert schedule.next_index(0, 2, consumed=4, queued=()) == 4
    assert schedule.next_index(1, 2, consumed=4, queued=()) == 5
    assert schedule.next_index(0, 2, consumed=5, queued=()) == 6
    assert schedule.next_index(0, 2, consumed=4, queued={4, 6}) == 8
    with pytest.raises(ValueError):
        schedule.next_index(2, 2, consumed=0, queued=())
    # Warm-up 10 steps, 2 steps per rollout batch: batch 3 is first trained on at step 16.
    assert schedule.first_step(3, 10, 2) == 16
    assert schedule.min_version(3, 10, 2, lag=1) == 15
    assert schedule.min_version(0, 0, 1, lag=4) == 0
    assert schedule.lag_ok(3, 15, 10, 2, lag=1) and schedule.lag_ok(3, 16, 10, 2, lag=1)
    assert not schedule.lag_ok(3, 14, 10, 2, lag=1)  # too stale
    assert not schedule.lag_ok(3, 17, 10, 2, lag=1)  # from another timeline (negative lag)


# --------------------------------------------------------------------------- the wire


def test_trajectories_round_trip():
    rng = np.random.default_rng(0)
    t = wire.Trajectories(
        index=7,
        version=6,
        run="abc",
        worker=1,
        arrays={
            "input_ids": rng.integers(0, 9, (4, 5)).astype(np.int32),
            "sampler_logp": rng.normal(size=(4, 5)).astype(np.float32),
        },
        rewards=np.array([1.0, 0.0, 0.5, 0.25], np.float32),
        reward_terms={"math-answer": np.array([1.0, 0.0, 0.5, 0.25], np.float32)},
        lengths=np.array([3, 4, 1, 2], np.int32),
        seconds=0.5,
        texts=["1", "22", "", "é|x"],
        stats={"weight_sync_seconds": 0.01},
    )
    back = wire.decode_trajectories(wire.encode_trajectories(t))
    assert (back.index, back.version, back.run, back.worker) == (7, 6, "abc", 1)
    for k, v in t.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v)
        assert back.arrays[k].dtype == v.dtype
    np.testing.assert_array_equal(back.rewards, t.rewards)
    np.testing.assert_array_equal(back.reward_terms["math-answer"], t.reward_terms["math-answer"])
    assert back.texts == t.texts and back.stats == t.stats and back.seconds == 0.5


def test_weights_refuse_another_model():
    blob = wire.encode_weights({"['a']": np.ones(3, np.float32)}, version=2)
    assert wire.weights_version(blob) == 2
    with pytest.raises(ValueError, match="do not match"):
        wire.decode_weights(blob, ["['b']"])


def test_listen_address():
    assert listen_address({"POSTTRAIN_TRAINER_ADDRESS": "127.0.0.1:9123"}) == ("127.0.0.1", 9123)
    assert listen_address({"POSTTRAIN_TRAINER_ADDRESS": "job-trainer-0-0.job:8477"}) == (
        "0.0.0.0",
        8477,
    )
    assert listen_address({}) == ("0.0.0.0", 8477)


# --------------------------------------------------------------------------- the transfer


class _State:
    def __init__(self, params):
        self.params = params


def _params(value: float) -> dict:
    return {
        "w": jnp.full((64, 32), value, jnp.float32),
        "layers": [{"b": jnp.arange(16, dtype=jnp.float32) + value}],
    }


def _service(**kw) -> RolloutService:
    args = dict(lag=1, workers=1, warmup=0, steps_per_rollout=1, consumed=0)
    args.update(kw)
    return RolloutService(say=lambda _m: None, address=("127.0.0.1", 0), **args)


class CuttingProxy:
    """A real TCP proxy that forwards the first ``cuts`` weight responses only in part (then
    closes the connection) and every other exchange whole: a transfer cut by the network."""

    def __init__(self, target_port: int, cuts: int = 1, keep: int = 1000):
        self.target, self.cuts, self.keep = target_port, cuts, keep
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target))
        request = client.recv(65536)
        upstream.sendall(request)
        cut = b"/v1/weights" in request and self.cuts > 0
        if cut:
            self.cuts -= 1
        sent = 0
        while True:
            data = upstream.recv(65536)
            if not data:
                break
            if cut and sent + len(data) > self.keep:
                client.sendall(data[: self.keep - sent])
                break
            client.sendall(data)
            sent += len(data)
        client.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_weights_travel_whole_and_versioned():
    service = _service()
    try:
        service.publish(0, _params(1.0))
        client = TrainerClient(f"127.0.0.1:{service.port}", say=lambda _m: None)
        held = HeldWeights(_State(_params(0.0)))
        assert sync(client, held, service.run_id, need=0, say=lambda _m: None)
        assert held.version == 0 and held.last_bytes > 64 * 32 * 4
        np.testing.assert_array_equal(held.state.params["w"], np.full((64, 32), 1.0))
        # A newer version is fetched; an older need does not wait.
        service.publish(1, _params(2.0))
        assert sync(client, held, service.run_id, need=0, say=lambda _m: None)
        assert held.version == 1
        np.testing.assert_array_equal(held.state.params["layers"][0]["b"], np.arange(16) + 2.0)
        # The assignment: this worker's index and the version it needs (lag 1, one step each).
        service._consumed = 3
        a = service.assignment(0)
        assert (a["index"], a["min_version"], a["run"]) == (3, 2, service.run_id)
    finally:
        service.close(finished=True, grace=0)


def test_a_cut_transfer_is_retried_and_never_half_applied():
    service = _service()
    proxy = CuttingProxy(service.port, cuts=2, keep=4000)
    said: list[str] = []
    try:
        service.publish(5, _params(3.0))
        client = TrainerClient(f"127.0.0.1:{proxy.port}", say=said.append)
        before = _params(0.0)
        held = HeldWeights(_State(before))
        assert sync(client, held, service.run_id, need=5, say=said.append)
        failed = [s for s in said if s.startswith("weight sync failed")]
        assert len(failed) == 2 and held.failures == 2, said
        assert all("keeping version -1" in s for s in failed)  # the old weights stayed
        assert held.version == 5
        np.testing.assert_array_equal(held.state.params["w"], np.full((64, 32), 3.0))
        np.testing.assert_array_equal(before["w"], np.zeros((64, 32)))  # never written into
    finally:
        proxy.close()
        service.close(finished=True, grace=0)


def test_trajectories_of_another_run_or_already_trained_are_refused():
    service = _service(consumed=2)
    try:
        t = wire.Trajectories(
            index=2,
            version=1,
            run="someone-else",
            worker=0,
            arrays={"x": np.zeros(2, np.float32)},
            rewards=np.zeros(2, np.float32),
            reward_terms={},
            lengths=np.zeros(2, np.int32),
            seconds=0.1,
        )
        client = TrainerClient(f"127.0.0.1:{service.port}", say=lambda _m: None)
        ok, why = client.send(t)
        assert not ok and "run" in why
        t.run, t.index = service.run_id, 1
        ok, why = client.send(t)
        assert not ok and "trained on already" in why
        t.index = 2
        assert client.send(t) == (True, "queued")
        got = service.take(2, first_step=2)
        assert got.version == 1 and service.stats.lags == [1]
    finally:
        service.close(finished=True, grace=0)


def test_named_leaves_are_the_paths():
    names = named_leaves(_params(0.0))
    assert sorted(names) == ["['layers'][0]['b']", "['w']"]
    assert isinstance(names["['w']"], np.ndarray)
    # A bfloat16 job: the float32 masters travel in the workers' compute dtype.
    half = named_leaves(_params(1.5), jnp.bfloat16)
    assert (
        half["['w']"].dtype == jnp.bfloat16 and half["['w']"].nbytes == names["['w']"].nbytes // 2
    )
    held = HeldWeights(_State(jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(0.0))))
    held.apply(wire.encode_weights(half, 3), 3, "run")
    assert (
        held.state.params["w"].dtype == jnp.bfloat16 and float(held.state.params["w"][0, 0]) == 1.5
    )


# --------------------------------------------------------------------------- TIS in the loss


def test_tis_in_the_loss_is_the_host_side_tis(tmp_path):
    """One step per rollout batch: TIS weights from the step's own forward (no old_logp pass)
    give the same loss and gradient as the host-side correction fed pi_old from a no-grad pass."""
    from posttrain.api.v1alpha1 import PostTrainJob
    from posttrain.trainer.algorithms import grpo
    from posttrain.trainer.algorithms.base import Models
    from posttrain.trainer.models import builtin_config, create_model

    m = quickstart(mode="async")
    m["spec"]["grpo"]["sftWarmupSteps"] = 0
    job = PostTrainJob.model_validate(m)
    g = job.spec.settings
    assert grpo.is_in_loss(g) and not grpo.needs_old_logp(g)
    from flax import nnx

    model = create_model(builtin_config("tiny", vocab_size=32))
    rng = np.random.default_rng(0)
    R, L = 4, 10
    ids = rng.integers(1, 32, (R, L)).astype(np.int32)
    mask = np.zeros((R, L), np.float32)
    mask[:, 5:9] = 1
    targets = np.concatenate([ids[:, 1:], np.zeros((R, 1), np.int32)], axis=1)
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((R, L), np.int32),
        "targets": targets,
        "completion_mask": mask,
        "tokens_per_row": np.full(R, mask.sum() / R, np.float32),
        "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
    }
    # pi_old of these tokens from the model itself, and a sampler a little off it.
    from posttrain.trainer.models.entropy import chunked_logprobs_and_entropy

    hidden, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(batch["attention_mask"]))
    (old,), _ = chunked_logprobs_and_entropy(
        hidden,
        model.logits,
        jnp.asarray(targets),
        temperatures=(g.temperature,),
        entropy_temperature=g.temperature,
    )
    old = np.asarray(old) * mask
    batch["sampler_logp"] = (old + rng.normal(0, 0.5, (R, L)) * mask).astype(np.float32)

    in_loss = grpo.make_loss(g)
    host_g = g.model_copy(update={"num_iterations": 2})  # host-side: old_logp + is_weights
    assert not grpo.is_in_loss(host_g)
    host_batch = dict(batch, old_logp=old.astype(np.float32))
    grpo.correct(host_batch, g.rollout_correction)
    host_batch["on_policy"] = np.ones(R, np.float32)  # the first step: ratio exactly 1
    host = grpo.make_loss(host_g)

    graphdef, params = nnx.split(model)

    def value(loss_fn, b):
        def f(p):
            out, _ = loss_fn(Models(policy=nnx.merge(graphdef, p)), b)
            return out

        return jax.value_and_grad(f)(params)

    v1, g1 = value(in_loss, {k: jnp.asarray(v) for k, v in batch.items()})
    v2, g2 = value(host, {k: jnp.asarray(v) for k, v in host_batch.items()})
    assert abs(float(v1)) > 1e-4
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # And the weights did something: without them the loss differs.
    plain = grpo.make_loss(
        g.model_copy(update={"rollout_correction": type(g.rollout_correction)()})
    )
    v3, _ = value(plain, {k: jnp.asarray(v) for k, v in batch.items()})
    assert abs(float(v3) - float(v1)) > 1e-6


def test_a_worker_holds_no_reference_or_optimizer_state():
    """A worker only samples and scores: the trainer's run keeps the KL reference (beta > 0),
    the worker's the same policy leaves in the compute dtype and nothing frozen besides."""
    from posttrain.trainer.async_rl.worker import worker_run
    from posttrain.trainer.setup import build_run

    m = quickstart(mode="async")
    m["spec"]["grpo"].update(beta=0.04, sftWarmupSteps=0)  # a KL anchor needs no warm-up
    job = parse_job(m)
    trainer, worker = build_run(job), worker_run(job)
    assert set(trainer.extras) == {"reference"} and trainer.opt_state is not None
    assert worker.extras == {} and worker.opt_state is None
    paths = lambda tree: [p for p, _ in jax.tree_util.tree_leaves_with_path(tree)]  # noqa: E731
    assert paths(worker.params) == paths(trainer.params)
    assert {x.dtype for x in jax.tree.leaves(worker.params)} == {jnp.dtype(job.spec.model.dtype)}
