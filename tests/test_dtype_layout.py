"""One KV layout across the cluster: the dtype choice, the start-up check, stores of two layouts,
the Prefill fingerprint check, and batched block moves between pools and bytes."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from decode_service.config import DecodeConfig
from decode_service.server import create_server as create_decode
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, PrefixSource, load_engine, random_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import IncompatibleStores, InvalidArgument
from kvcluster.kv.block_io import batch_from_payloads, batch_to_payloads
from kvcluster.kv.dtypes import cpu_prefers_bf16, resolve_dtype
from kvcluster.kv.pool import KVLayout, KVPool
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.proto import cache_pb2
from kvcluster.rpc.store_client import StoreClient
from prefill_service.config import PrefillConfig
from prefill_service.server import create_server as create_prefill
from tests.cluster_fixtures import running_redis, start_store
from tests.conftest import TINY_CONFIG

SYSTEM = ("You are a careful assistant. Answer briefly and precisely, citing the section you used. "
          "Section 1 covers the northern region, section 2 the southern region, section 3 the coast. ") * 4
MESSAGES = [("system", SYSTEM), ("user", "Which section covers the coast?")]
CHAT = [ChatMessage(role, content) for role, content in MESSAGES]


# ---- dtype choice --------------------------------------------------------------------------

def test_auto_dtype_is_bf16_exactly_where_the_cpu_prefers_bf16():
    name, why = resolve_dtype("auto", "cpu")
    assert name == ("bfloat16" if cpu_prefers_bf16() else "float32") and why.startswith("auto:")
    assert resolve_dtype("float16", "cpu") == ("float16", "as configured")
    with pytest.raises(InvalidArgument, match="dtype: must be one of auto, float32, float16, bfloat16"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(InvalidArgument, match="dtype"):
        PrefillConfig(dtype="fp8")


# ---- batched block moves ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pool_reads_and_writes_many_blocks_in_one_batch(dtype):
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype)
    source, target = KVPool(layout, 8), KVPool(layout, 8)
    source.kv.copy_(torch.randn(source.kv.shape).to(layout.torch_dtype))
    payloads = batch_to_payloads(source.read([5, 1, 6]))
    assert [len(p) for p in payloads] == [layout.block_nbytes] * 3
    assert payloads[1] == source.export_block(1)
    target.write([0, 7, 3], batch_from_payloads(payloads, layout.block_nbytes))
    assert torch.equal(target.kv[[0, 7, 3]], source.kv[[5, 1, 6]])
    assert not target.kv[[1, 2, 4, 5, 6]].any()
    snapshot = source.read([2])
    source.kv[2].zero_()  # a read is a snapshot: later writes to the slot do not change it
    assert np.frombuffer(batch_to_payloads(snapshot)[0], dtype=np.uint8).any()
    with pytest.raises(ValueError, match="needs"):
        batch_from_payloads([payloads[0][:-1]], layout.block_nbytes)
    with pytest.raises(ValueError, match="does not fit"):
        target.write([0, 1], batch_from_payloads(payloads[:1], layout.block_nbytes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pool_moves_blocks_through_pinned_buffers():
    layout = KVLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    gpu = KVPool(layout, 64, "cuda")
    gpu.kv.copy_(torch.randn(gpu.kv.shape, device="cuda").to(torch.bfloat16))
    payloads = batch_to_payloads(gpu.read(list(range(0, 64, 2))))
    again = KVPool(layout, 64, "cuda")
    batch = batch_from_payloads(payloads, layout.block_nbytes, "cuda")
    assert batch.keep_alive is not None and batch.keep_alive.is_pinned() and batch.data.is_cuda
    again.write(list(range(32)), batch)
    assert torch.equal(again.kv[:32], gpu.kv[0:64:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_engines_hand_blocks_over_exactly(tokenizer, dtype):
    """Engine A prefills on the GPU and exports its blocks (one gather, a pinned copy to host);
    engine B loads them (pinned staging, one scatter): bitwise the same K/V, and B continues with
    the tokens A gets when it continues from its own blocks."""
    config = EngineConfig(kv_capacity_bytes=64 * TINY_CONFIG.kv_layout(16, dtype).block_nbytes)
    a, b = (random_engine(TINY_CONFIG, tokenizer, 7, config, dtype, "cuda") for _ in range(2))
    prompt, params = list(range(100, 164)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    seq = a.add_request(prompt, replace(params, max_tokens=1), keep_blocks=True)
    while seq.finish_reason is None:
        a.step()
    full = seq.block_table[:4]  # the prompt's 4 full blocks
    export = a.export_blocks(seq, 0, 4)
    payloads = batch_to_payloads(export.batch)
    staged = batch_from_payloads(payloads, b.layout.block_nbytes, b.pool.device)
    outputs = []
    for engine, prefix in ((a, PrefixSource(export.hashes)), (b, PrefixSource(export.hashes, staged, 0, 64))):
        resumed = engine.add_request(prompt, params, prefix=prefix)  # a: its local cache; b: the staged blocks
        assert resumed.num_computed == 63
        if engine is b:
            assert torch.equal(b.pool.kv[resumed.block_table[:3]], a.pool.kv[full[:3]])
        while resumed.finish_reason is None:
            engine.step()
        outputs.append(resumed.output_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6


# ---- the start-up check ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_engine():
    return load_engine(device="cpu", dtype="bfloat16", config=EngineConfig(kv_capacity_bytes=96 << 20))


@pytest.fixture(scope="module")
def fp32_engine():
    return load_engine(device="cpu", dtype="float32", config=EngineConfig(kv_capacity_bytes=96 << 20))


def prefill_config(redis_url: str, **overrides) -> PrefillConfig:
    return PrefillConfig(port=0, metrics_port=-1, redis_url=redis_url, store_timeout_seconds=5.0,
                         store_wait_seconds=2.0, **overrides)


def test_worker_refuses_to_start_against_a_store_of_another_layout(bf16_engine):
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=8, dtype="float32")
        try:
            assert store.flush_index()
            with pytest.raises(IncompatibleStores) as refused:
                create_prefill(prefill_config(redis_server.url), engine=bf16_engine)
            message = str(refused.value)
            assert "kvlayout-v1:L30:B16:H3:D64:bfloat16" in message  # the worker's layout
            assert "kvlayout-v1:L30:B16:H3:D64:float32" in message   # the store's layout
            assert store.store_id in message and "KVC_DTYPE" in message
            # The service's own entry point says the same and exits non-zero, before serving.
            done = subprocess.run([sys.executable, "-m", "decode_service", "--port", "0", "--metrics-port", "-1",
                                   "--redis-url", redis_server.url, "--dtype", "bfloat16", "--store-wait-seconds", "2"],
                                  capture_output=True, text=True, timeout=180)
            assert done.returncode == 2, done.stderr
            assert "float32" in done.stderr and "bfloat16" in done.stderr and "READY" not in done.stdout
        finally:
            store.stop(0)


def test_stores_of_two_layouts_serve_two_dtypes_side_by_side(bf16_engine):
    """A cluster of two dtypes: each worker uses only the stores of its own layout."""
    with running_redis() as redis_server:
        fp32_store = start_store(redis_server.url, blocks=64, dtype="float32", store_id="fp32-store")
        bf16_store = start_store(redis_server.url, blocks=64, dtype="bfloat16", store_id="bf16-store")
        assert fp32_store.flush_index() and bf16_store.flush_index()
        server, _ = create_prefill(prefill_config(redis_server.url), engine=bf16_engine,
                                   registry=CollectorRegistry())
        server.start()
        try:
            assert [s.store_id for s in server.prefiller.cache.live_stores()] == ["bf16-store"]
            prompt = bf16_engine.tokenizer.encode_chat(CHAT)
            outcome = server.prefiller.prefill("two-dtypes", prompt, SamplingParams(temperature=0.0))
            assert not outcome.fallbacks and outcome.bytes_pushed > 0
            assert {ref.store_id for ref in outcome.blocks} == {"bf16-store"}
            assert fp32_store.pool.stats().blocks_used == 0
            assert bf16_store.pool.stats().blocks_used == len(outcome.blocks)
        finally:
            server.stop(0)
            fp32_store.stop(0)
            bf16_store.stop(0)


# ---- decode checks what Prefill returns ------------------------------------------------------

def test_decode_does_not_trust_a_prefill_answer_computed_under_another_fingerprint(bf16_engine, fp32_engine):
    """A float32 prefill service behind a bfloat16 decode: its first token and blocks are refused,
    the request is computed locally (a counted fallback), and the answer is the bf16 engine's."""
    # A prompt no other test put in the shared engine's local cache, so decode must ask Prefill;
    # the reference is computed before a server's engine thread drives the engine, filling no cache.
    messages = [("system", "Mismatch check. " + SYSTEM), MESSAGES[1]]
    prompt = bf16_engine.tokenizer.encode_chat([ChatMessage(role, content) for role, content in messages])
    expected = [e.token_id for e in bf16_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8),
                                                         use_cache=False)]
    with running_redis() as redis_server:
        store = start_store(redis_server.url, blocks=64, dtype="bfloat16")
        prefill, prefill_port = create_prefill(prefill_config(""), engine=fp32_engine, registry=CollectorRegistry())
        prefill.start()
        registry = CollectorRegistry()
        decode, decode_port = create_decode(DecodeConfig(
            port=0, metrics_port=-1, redis_url=redis_server.url, prefill_target=f"127.0.0.1:{prefill_port}",
            store_wait_seconds=2.0), engine=bf16_engine, registry=registry)
        decode.start()
        try:
            with Client(f"127.0.0.1:{decode_port}") as client:
                result = client.generate(messages=messages, max_tokens=8, temperature=0.0)
            mismatches = registry.get_sample_value("kvcluster_fallbacks_total", {"reason": "prefill_mismatch"})
            assert mismatches == 1
            assert result.token_ids == expected
        finally:
            decode.stop(0)
            prefill.stop(0)
            store.stop(0)


# ---- the whole cluster in bfloat16 -----------------------------------------------------------

@pytest.mark.slow  # a multi-process cluster
def test_bfloat16_cluster_serves_a_repeated_prompt_from_the_cache_exactly(bf16_engine, tmp_path):
    with open(tmp_path / "cluster.log", "w") as log_stream, \
            Cluster(ClusterPorts.any_free(), dtype="bfloat16", log_stream=log_stream) as cluster:
        store = StoreClient(f"127.0.0.1:{cluster.children['cache_store'].grpc_port}", bf16_engine.layout,
                            metadata=cluster.internal_metadata)
        try:
            stats: cache_pb2.StatsResponse = store.stats()
        finally:
            store.close()
        assert stats.layout.dtype == "bfloat16" and stats.layout.num_layers == 30
        with Client(cluster.decode_target) as client:
            cold = client.generate(messages=MESSAGES, max_tokens=12, temperature=0.0)
            warm = client.generate(messages=MESSAGES, max_tokens=12, temperature=0.0)
    prompt = bf16_engine.tokenizer.encode_chat(CHAT)
    assert cold.usage.prompt_tokens == len(prompt) > 64
    assert warm.usage.cached_tokens >= len(prompt) - bf16_engine.config.block_size
    expected = [e.token_id for e in bf16_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12))]
    assert cold.token_ids == warm.token_ids == expected
