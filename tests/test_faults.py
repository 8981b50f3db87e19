"""Injected cache-path faults never change an answer: each one is recomputed around and counted."""

import threading

import pytest

from kvcluster.engine.engine import EngineConfig
from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import InvalidArgument
from kvcluster.kv.index import RedisIndex
from kvcluster.proto import common_pb2, decode_pb2
from kvcluster.rpc.cache_client import KVCacheClient
from kvcluster.rpc.faults import NO_FAULTS, FaultyCacheClient, FaultyStoreClient, Faults
from kvcluster.rpc.store_client import StoreClient
from kvcluster.worker.server import make_cache_client
from tests.cluster_fixtures import in_process_cluster
from tests.store_fixtures import make_blocks

PROMPT = ("A freight forwarder consolidates shipments from several customers into one container, "
          "books space with a carrier, prepares the bill of lading and arranges customs clearance. "
          "Summarise what a freight forwarder does in one sentence:")


@pytest.fixture(scope="module")
def cluster():
    """Workers without their local cache tier: every reuse here goes through the store, whose
    failure paths these tests strike (tests/test_prefix_cache.py covers the first tier). `--faults`
    with only a seed builds the fault wrappers with nothing to inject; each test sets its faults."""
    with in_process_cluster(EngineConfig(kv_capacity_bytes=128 << 20, prefix_caching=False), 48,  # small: the eviction test fills it
                            dict(store_timeout_seconds=3.0, faults="seed=1"),
                            dict(store_timeout_seconds=3.0, local_prefill_max_tokens=16, faults="seed=2")) as running:
        yield running  # (30 new tokens go to Prefill)


def reference(smollm_engine, prompt: str) -> list[int]:
    ids = smollm_engine.tokenizer.encode(prompt)
    return [e.token_id for e in smollm_engine.generate_no_cache(ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))]


def generate(cluster, prompt: str) -> tuple[list[int], decode_pb2.GenerateResponse]:
    ids, last = [], None
    for response in cluster["stub"].Generate(decode_pb2.GenerateRequest(
            prompt=prompt, sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)), timeout=120):
        ids.extend(response.token_ids)
        last = response
    cluster["decode"].generator.flush_pushes()
    cluster["store"].flush_index()
    return ids, last


def counted(registry, reason: str) -> float:
    return registry.get_sample_value("kvcluster_fallbacks_total", {"reason": reason}) or 0.0


def set_faults(cluster, decode: str = "", prefill: str = "") -> None:
    cluster["decode"].generator.cache.faults = Faults.parse(decode) if decode else NO_FAULTS
    cluster["prefill"].prefiller.cache.faults = Faults.parse(prefill) if prefill else NO_FAULTS


# Decode faults strike a warm prompt (decode pulls it itself). Prefill faults need the prefill
# service called, so their prompt is the cached one plus a fresh 30-odd-token question.
@pytest.mark.parametrize("decode_faults, prefill_faults, reason, registry", [
    ("corrupt=1.0", "", "checksum_mismatch", "decode_registry"),
    ("pull_drop=1.0", "", "store_unavailable", "decode_registry"),
    ("pull_delay_ms=150", "", None, "decode_registry"),
    ("", "push_fail=1.0", "push_failed", "prefill_registry"),
    ("", "corrupt=1.0", "checksum_mismatch", "prefill_registry"),
    ("redis_down=1", "redis_down=1", "redis_unavailable", "decode_registry"),
])
def test_fault_is_recomputed_and_counted(cluster, smollm_engine, decode_faults, prefill_faults, reason, registry):
    generate(cluster, PROMPT)  # the prompt's blocks are cached before the fault strikes
    prompt = PROMPT
    if prefill_faults:
        prompt += f" Also, in case {prefill_faults}, list three documents a forwarder prepares for an export shipment."
    before = counted(cluster[registry], reason) if reason else 0.0
    set_faults(cluster, decode_faults, prefill_faults)
    try:
        ids, last = generate(cluster, prompt)
    finally:
        set_faults(cluster)
    assert ids == reference(smollm_engine, prompt)
    assert last.finish_reason == decode_pb2.FINISH_REASON_LENGTH
    if reason:
        assert counted(cluster[registry], reason) > before
    else:
        assert last.usage.cached_tokens > 0 and last.usage.timing.kv_pull_ms >= 150
    assert cluster["store"].pool.stats().pinned_blocks == 0
    assert cluster["decode"].worker.call(lambda eng: eng.blocks.num_used) == 0
    assert cluster["prefill"].worker.call(lambda eng: eng.blocks.num_used) == 0


def test_block_evicted_between_lookup_and_pull_is_recomputed(cluster, smollm_engine):
    generate(cluster, PROMPT)  # cached
    engine = cluster["decode"].worker.engine
    store = StoreClient(f"127.0.0.1:{cluster['store'].port}", engine.layout)
    before = counted(cluster["decode_registry"], "short_pull")
    # decode looks the prefix up, then waits 1.5 s before pulling; meanwhile 48 other blocks evict it
    set_faults(cluster, "pull_delay_ms=1500")
    flood = threading.Timer(0.3, lambda: store.push_blocks(engine.fingerprint, make_blocks(engine.layout, 48, seed=9,
                                                                                             fingerprint=engine.fingerprint)))
    flood.start()
    try:
        ids, last = generate(cluster, PROMPT)
    finally:
        flood.join()
        set_faults(cluster)
        store.close()
    assert ids == reference(smollm_engine, PROMPT)
    assert last.usage.cached_tokens == 0
    assert counted(cluster["decode_registry"], "short_pull") > before


def test_faults_are_wrapped_around_the_cache_client_only_when_set(cluster):
    decode = cluster["decode"]
    assert isinstance(decode.generator.cache, FaultyCacheClient)
    assert isinstance(decode.generator.cache.store(f"127.0.0.1:{cluster['store'].port}"), FaultyStoreClient)
    plain = make_cache_client(decode.config.model_copy(update={"faults": ""}), decode.worker.engine)
    try:
        assert type(plain) is KVCacheClient and type(plain.index) is RedisIndex
        assert type(plain.store(f"127.0.0.1:{cluster['store'].port}")) is StoreClient
    finally:
        plain.close()
        plain.index.close()


def test_fault_spec_parsing():
    faults = Faults.parse("pull_drop=0.25, pull_delay_ms=10,redis_down=1,seed=3")
    assert (faults.pull_drop, faults.pull_delay_ms, faults.redis_down, faults.active) == (0.25, 10.0, True, True)
    assert not Faults.parse("").active
    with pytest.raises(InvalidArgument, match="unknown fault"):
        Faults.parse("explode=1")
    with pytest.raises(InvalidArgument, match="faults.corrupt"):
        Faults.parse("corrupt=2")
