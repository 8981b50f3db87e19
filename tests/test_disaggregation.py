"""Decode's per-request choice between computing a prompt here and handing it to a prefill
replica (conditional disaggregation), decided from measured state."""

from decode_service.prefill_pool import ReplicaState
from decode_service.prompt_kv import LocalPrefillPolicy
from kvcluster.worker.registration import host_id
from tests.conftest import make_tiny_engine

ELSEWHERE = "another-host-id"


def measured(tokenizer, mode: str = "auto", fixed: int = -1) -> LocalPrefillPolicy:
    engine = make_tiny_engine(tokenizer)
    engine.prefill_cost.fixed_s, engine.prefill_cost.per_token_s = 0.01, 0.001  # 1 ms per token here
    policy = LocalPrefillPolicy(fixed, engine, mode=mode)
    policy.observe_prefill_call(wall_s=0.35, compute_s=0.25, computed_tokens=250)  # 100 ms overhead, 1 ms/token
    return policy


def test_short_prompts_stay_local_and_long_ones_go_where_compute_is_added(tokenizer):
    policy = measured(tokenizer)
    assert 85 <= policy.max_tokens() <= 90  # (overhead - fixed part) / per-token, floored
    assert policy.decide(60, [ReplicaState("p:1", ELSEWHERE, 0)], 0) == (False, "short")
    assert policy.decide(600, [ReplicaState("p:1", ELSEWHERE, 0)], 0) == (True, "remote")
    # Only replicas on this worker's own cores: a hand-off adds a call, a push and a pull, no compute.
    assert policy.decide(600, [ReplicaState("p:1", host_id(), 0)], 0) == (False, "colocated")
    assert policy.decide(600, [ReplicaState("p:1", host_id(), 0), ReplicaState("p:2", ELSEWHERE, 0)], 0) == (True, "remote")
    assert policy.decide(600, [], 0) == (False, "no_replica")
    # An unknown host (a static --prefill-target without registry) may add compute.
    assert policy.decide(600, [ReplicaState("p:1", "", 0)], 0) == (True, "remote")


def test_a_busy_prefill_queue_keeps_the_prompt_here_unless_this_queue_is_longer(tokenizer):
    policy = measured(tokenizer)
    busy = [ReplicaState("p:1", ELSEWHERE, 5000)]
    assert policy.decide(600, busy, local_queued=0) == (False, "prefill_busy")
    assert policy.decide(600, busy, local_queued=8000) == (True, "remote")


def test_explicit_modes_override_the_measured_choice(tokenizer):
    here = [ReplicaState("p:1", host_id(), 10_000)]
    assert measured(tokenizer, mode="always").decide(600, here, 0) == (True, "threshold")
    assert measured(tokenizer, fixed=0).decide(1, here, 0) == (True, "threshold")
    assert measured(tokenizer, mode="never").decide(600, [ReplicaState("p:1", ELSEWHERE, 0)], 0) == (False, "never")


def test_host_id_is_stable_and_names_this_process_cores():
    assert host_id() == host_id() and len(host_id()) == 16
