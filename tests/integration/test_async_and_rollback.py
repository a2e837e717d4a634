"""Async mode and the policy registry against real generator, reward and learner servers (tiny model,
lexicon reward, real Redis): staleness is bounded, a rollback restores an earlier version bit for bit
as a new version, the guard rolls back on a KL violation, and the `flywheel policy` CLI."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.learner.server import build_server as build_learner
from flywheel.v1 import learner_pb2, learner_pb2_grpc
from tests.conftest import auth
from tests.integration.test_learner import _generator_policy, generator, learner_config, reward  # noqa: F401


def _served_weights(generator_server: Any) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in generator_server.generator_servicer.engine.weights_for_push().items()}


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _learner_stub(port: int) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, learner_pb2_grpc.LearnerServiceStub(channel)


def test_async_mode_never_trains_on_samples_older_than_max_policy_lag(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,  # noqa: F811
    redis_client: Any,
) -> None:
    # Two batches generate ahead of training, so samples can reach two versions of lag; lag 1 is allowed.
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", mode="async", rollout_prefetch=2, max_policy_lag=1,
                            stale_policy="drop")
    server = start_server(build_learner, config)
    learner = server.learner
    steps = 6
    for step in range(1, steps + 1):
        metrics = learner.run_step()
        assert learner.status().policy_version == step
        assert metrics["staleness_max"] <= 1 and "behaviour_kl" in metrics

    history = list(learner.async_rollouts.history)
    assert [h.training_version for h in history] == list(range(steps))
    for record in history:
        assert len(record.sample_versions) == config.batch_size
        lags = [record.training_version - v for v in record.sample_versions]
        assert all(0 <= lag <= config.max_policy_lag for lag in lags), record
        assert all(record.training_version - v > config.max_policy_lag for v in record.dropped_versions), record
    trained = sum(len(h.sample_versions) for h in history)
    dropped = sum(len(h.dropped_versions) for h in history)
    samples = {s.name: s.value for m in server.registry.collect() for s in m.samples}
    assert samples["flywheel_learner_sample_staleness_versions_count"] == trained + dropped
    assert samples["flywheel_learner_stale_samples_dropped_total"] == dropped
    assert "flywheel_learner_behaviour_kl" in samples


# A checkpoint after every step waits for the push in flight itself: its figures still reach the next step.
@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_async_mode_pushes_in_the_background_in_order_and_the_next_batch_samples_the_new_version(
    checkpoint_every: int, generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any,  # noqa: F811
    tiny_llama_path: str, internal_token: str, redis_client: Any,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", mode="async", rollout_prefetch=1, max_policy_lag=1,
                            stale_policy="drop", delta_push=True, checkpoint_every=checkpoint_every)
    learner = start_server(build_learner, config).learner
    pushed: list[float] = []
    for step in range(1, 6):
        metrics = learner.run_step()
        assert learner.status().policy_version == step
        if step > 1:  # a step reports the push of the version before it, which finished meanwhile
            pushed.append(metrics["push_version"])
            assert metrics["push_replicas_ok"] == 1.0 and metrics["push_bytes"] > 0
    assert pushed == [1.0, 2.0, 3.0, 4.0]
    last = learner.wait_for_push()
    assert last is not None and (last.version, last.ok, last.kind) == (5, [f"127.0.0.1:{generator.port}"], "delta")
    assert _generator_policy(generator.port, internal_token) == 5
    # Each version is registered with its lineage, and the generator serves the last one bit for bit.
    entries = {e.version: e for e in learner.publisher.registry.entries()}
    assert [entries[v].parent_version for v in range(1, 6)] == [0, 1, 2, 3, 4]
    _assert_bit_equal(_served_weights(generator), {n: t.detach().clone()
                                                   for n, t in learner.model.policy.state_dict().items()})
    # The rollout thread waited for each push: batch k was sampled by version k-1 (lag 1 at most,
    # none dropped), as with a blocking push.
    for record in learner.async_rollouts.history:
        assert set(record.sample_versions) <= {record.training_version, record.training_version - 1}, record
        assert record.dropped_versions == [], record


def test_rollback_restores_an_earlier_version_bit_for_bit_as_a_new_version(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,  # noqa: F811
    internal_token: str, redis_client: Any,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", delta_push=True)
    server = start_server(build_learner, config)
    learner = server.learner
    learner.run_step()
    version_1 = _served_weights(generator)
    learner.run_step()
    learner.run_step()
    assert _generator_policy(generator.port, internal_token) == 3
    with pytest.raises(AssertionError):
        _assert_bit_equal(_served_weights(generator), version_1)

    channel, stub = _learner_stub(server.port)
    with channel:
        with pytest.raises(grpc.RpcError) as denied:
            stub.RollbackPolicy(learner_pb2.RollbackPolicyRequest(version=1), timeout=60)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unknown:
            stub.RollbackPolicy(learner_pb2.RollbackPolicyRequest(version=99), timeout=60, metadata=auth(internal_token))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        reply = stub.RollbackPolicy(learner_pb2.RollbackPolicyRequest(version=1, reason="test"), timeout=120,
                                    metadata=auth(internal_token))
        assert (reply.new_policy_version, reply.restored_from_version) == (4, 1)
        assert _generator_policy(generator.port, internal_token) == 4
        _assert_bit_equal(_served_weights(generator), version_1)
        _assert_bit_equal({n: t.detach().clone() for n, t in learner.model.policy.state_dict().items()}, version_1)

        listed = stub.ListPolicies(learner_pb2.ListPoliciesRequest(limit=3), timeout=10,
                                  metadata=auth(internal_token)).policies
        assert [r.version for r in listed] == [4, 3, 2]
        newest = listed[0]
        assert (newest.parent_version, newest.restored_from_version, newest.reason) == (3, 1, "rollback:manual")
        assert newest.current and newest.restorable and not listed[1].current

    # Training goes on from the restored weights (fresh optimizer moments), as version 5.
    metrics = learner.run_step()
    assert learner.status().policy_version == 5 and metrics["push_replicas_ok"] == 1.0


def test_async_rollback_waits_for_the_push_in_flight_and_discards_prefetched_samples(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,  # noqa: F811
    internal_token: str, redis_client: Any,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", mode="async", delta_push=True)
    learner = start_server(build_learner, config).learner
    learner.run_step()
    assert learner.wait_for_push() is not None  # version 1 is serving
    version_1 = _served_weights(generator)
    learner.run_step()
    learner.run_step()  # returns with version 3's push handed to the push thread
    new_version, restored = learner.rollback_policy(1)
    # The rollback's version landed after version 3's: it is 4, the generator serves it, bit for bit v1.
    assert (new_version, restored) == (4, 1)
    assert _generator_policy(generator.port, internal_token) == 4
    _assert_bit_equal(_served_weights(generator), version_1)
    entries = {e.version: e for e in learner.publisher.registry.entries()}
    assert entries[3].parent_version == 2 and (entries[4].parent_version, entries[4].restored_from) == (3, 1)
    # The next step trains only on samples of the restored policy: the prefetched batch was discarded.
    learner.run_step()
    assert learner.status().policy_version == 5
    last = learner.async_rollouts.history[-1]
    assert last.training_version == 4 and set(last.sample_versions) == {4}, last


def test_guard_rolls_back_on_a_kl_violation(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,  # noqa: F811
    internal_token: str, redis_client: Any,
) -> None:
    # A KL bound no update can meet: the first trained version violates it.
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", guard_enabled=True, guard_max_kl=1e-9, guard_eval_prompts=2)
    server = start_server(build_learner, config)
    learner = server.learner
    initial = _served_weights(generator)  # version 0, registered with a snapshot on the first step
    metrics = learner.run_step()
    assert metrics["eval_kl"] > config.guard_max_kl
    assert (metrics["guard_rollback_from"], metrics["guard_rollback_to"]) == (1.0, 0.0)
    assert learner.status().policy_version == 2
    assert _generator_policy(generator.port, internal_token) == 2
    _assert_bit_equal(_served_weights(generator), initial)
    entry = learner.publisher.registry.get(2)
    assert (entry.restored_from, entry.parent_version, entry.reason) == (0, 1, "rollback:kl")
    assert learner.publisher.registry.get(1).metrics["eval_kl"] == metrics["eval_kl"]
    samples = {(s.name, s.labels.get("reason")): s.value for m in server.registry.collect() for s in m.samples}
    assert samples[("flywheel_learner_rollbacks_total", "kl")] == 1.0


def test_policy_cli_lists_promotes_rolls_back_and_maps_errors_to_exit_codes(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,  # noqa: F811
    internal_token: str, redis_client: Any,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}")
    server = start_server(build_learner, config)
    learner = server.learner
    learner.run_step()
    learner.run_step()
    runner = CliRunner()
    target = ["--learner", f"127.0.0.1:{server.port}", "--token", internal_token]

    def cli(*args: str) -> Any:
        return runner.invoke(app, ["policy", *args, *target])

    listed = cli("list", "--json")
    assert listed.exit_code == 0, listed.output
    assert '"version": "2"' in listed.output and '"reason": "initial"' in listed.output

    assert cli("promote", "not-a-number").exit_code == 2
    bad = cli("rollback", "--to", "-1")
    assert bad.exit_code == 2 and "version" in bad.output
    assert runner.invoke(app, ["policy", "list", "--learner", "nohost"]).exit_code == 2
    missing = cli("promote", "42")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output and "42" in missing.output
    wrong_token = runner.invoke(app, ["policy", "rollback", "--learner", f"127.0.0.1:{server.port}",
                                      "--token", "wrong"])
    assert wrong_token.exit_code == 1 and "UNAUTHENTICATED" in wrong_token.output

    promoted = cli("promote", "1")
    assert promoted.exit_code == 0, promoted.output
    rolled = cli("rollback")  # default target: the promoted version
    assert rolled.exit_code == 0, rolled.output
    assert "restored version 1" in rolled.output and "version 3" in rolled.output
    assert _generator_policy(generator.port, internal_token) == 3
    assert learner.publisher.registry.get(3).restored_from == 1
