"""Batch-invariant numerics are the default and `--fast-numerics` opts out; a worker whose device or
dtype has no batch-invariant kernels says that exactness is not guaranteed: one start-up line, its
registry entry, the gateway's /health. The metric is checked on a live cluster in
tests/test_observability.py."""

import asyncio
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from decode_service.config import DecodeConfig
from gateway.config import GatewayConfig
from gateway.server import Gateway
from kvcluster.engine.engine import Engine, EngineConfig, random_engine
from kvcluster.model.kernels import invariant_linear_op
from kvcluster.worker.config import WorkerConfig
from kvcluster.worker.engine_worker import EngineWorker
from kvcluster.worker.numerics import OPTED_OUT, log_numerics, missing_kernels, numerics_status
from kvcluster.worker.registration import make_registration
from prefill_service.config import PrefillConfig
from tests.cluster_fixtures import running_redis
from tests.conftest import TINY_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_KV_BYTES = 8 << 20
needs_kernels = pytest.mark.skipif(invariant_linear_op() is None, reason="compiled kernels unavailable on this machine")


def tiny(tokenizer, config: EngineConfig, dtype: str = "float32", device: str = "cpu") -> Engine:
    """A seeded tiny engine under `config` (its pool sized for the tiny model)."""
    return random_engine(TINY_CONFIG, tokenizer, engine_config=replace(config, kv_capacity_bytes=TINY_KV_BYTES),
                         dtype=dtype, device=device)


def numerics_lines(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name == "kvcluster.worker.numerics"]


@needs_kernels
def test_batch_invariant_by_default_and_fast_only_on_request(smollm_engine, tokenizer):
    assert EngineConfig().deterministic and not WorkerConfig().fast_numerics
    assert smollm_engine.model.numerics == "batch-invariant"  # load_engine(...) with the default EngineConfig
    default = tiny(tokenizer, WorkerConfig().engine_config())
    assert default.model.numerics == "batch-invariant" and numerics_status(default).guaranteed
    flagged = DecodeConfig.parse(["--fast-numerics"], environ={})
    from_env = PrefillConfig.from_env({"KVC_FAST_NUMERICS": "true"})
    for config in (flagged, from_env):
        engine = tiny(tokenizer, config.engine_config())
        assert config.fast_numerics and engine.model.numerics == "fast"
        assert numerics_status(engine).reason == OPTED_OUT
        assert engine.fingerprint != default.fingerprint  # the two modes never share blocks
    assert not DecodeConfig.parse(["--no-fast-numerics"], environ={"KVC_FAST_NUMERICS": "1"}).fast_numerics


def test_float16_on_cpu_runs_fast_and_the_worker_warns_once(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="kvcluster.model.llama"):
        engine = tiny(tokenizer, EngineConfig(), dtype="float16")  # asked for batch-invariant numerics (the default)
    assert "exactness is not guaranteed" in caplog.text  # the model's own line
    status = numerics_status(engine)
    assert (status.mode, status.guaranteed, status.reason) == ("fast", False, missing_kernels("cpu", "float16"))
    assert "no batch-invariant kernels for float16" in status.reason
    assert status.registry_fields() == {"numerics": "fast", "exactness_guaranteed": "false"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvcluster.worker.numerics"):
        log_numerics("decode", status)
    [line] = numerics_lines(caplog.records)
    assert line.levelno == logging.WARNING
    assert "fast on cpu float16, exactness is NOT guaranteed" in line.getMessage()
    assert "no batch-invariant kernels for float16" in line.getMessage()
    assert missing_kernels("cuda", "bfloat16").startswith("the Triton kernels are unavailable on cuda: ")


def test_cuda_says_why_its_triton_kernels_are_off(monkeypatch):
    monkeypatch.setenv("KVC_TRITON", "0")
    assert missing_kernels("cuda", "float16") == ("the Triton kernels are unavailable on cuda: "
                                                  "the Triton kernels are turned off (KVC_TRITON=0)")


def test_the_start_up_line_says_whether_exactness_holds(tokenizer, caplog):
    fast = numerics_status(tiny(tokenizer, EngineConfig(deterministic=False)))
    with caplog.at_level(logging.INFO, logger="kvcluster.worker.numerics"):
        log_numerics("prefill", fast)
    [line] = numerics_lines(caplog.records)
    assert line.levelno == logging.WARNING and "NOT guaranteed" in line.getMessage()
    assert "by request (--fast-numerics" in line.getMessage()
    if invariant_linear_op() is not None:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kvcluster.worker.numerics"):
            log_numerics("prefill", numerics_status(tiny(tokenizer, EngineConfig())))
        [line] = numerics_lines(caplog.records)
        assert line.levelno == logging.INFO and "batch-invariant on cpu float32, exactness guaranteed" in line.getMessage()


def test_without_compiled_kernels_the_worker_says_why():
    """A fresh process with the kernels turned off (KVC_KERNELS=0): the plain torch path."""
    code = "\n".join([
        "import logging, sys",
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(levelname)s %(name)s %(message)s')",
        "from kvcluster.engine.engine import EngineConfig, random_engine",
        "from kvcluster.worker.numerics import log_numerics, numerics_status",
        "from tests.conftest import TINY_CONFIG",
        f"engine = random_engine(TINY_CONFIG, None, engine_config=EngineConfig(kv_capacity_bytes={TINY_KV_BYTES}))",
        "log_numerics('decode', numerics_status(engine))",
    ])
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, "KVC_KERNELS": "0"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("WARNING kvcluster.worker.numerics")]
    assert "fast on cpu float32, exactness is NOT guaranteed" in line
    assert "the compiled CPU kernels are unavailable" in line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_is_batch_invariant_through_the_triton_kernels(tokenizer, dtype):
    engine = tiny(tokenizer, EngineConfig(), dtype=dtype, device="cuda")
    status = numerics_status(engine)
    assert (status.mode, status.guaranteed, status.reason) == ("batch-invariant", True, "")
    assert engine.model.triton is not None and "/triton-" in engine.model.numerics_identity
    fast = numerics_status(tiny(tokenizer, EngineConfig(deterministic=False), dtype=dtype, device="cuda"))
    assert (fast.mode, fast.guaranteed, fast.reason) == ("fast", False, OPTED_OUT)


async def health_before_and_after(gateway: Gateway, change) -> tuple[dict, dict]:
    """The gateway's /health body, then again after `change()` (registry refreshed before each)."""
    try:
        await gateway.refresh()
        before = json.loads(gateway.health(None).body)
        change()
        await gateway.refresh()
        return before, json.loads(gateway.health(None).body)
    finally:
        await gateway.replicas.close()


@needs_kernels
def test_registry_and_gateway_health_report_each_workers_numerics(tokenizer):
    engines = {"exact": tiny(tokenizer, EngineConfig()), "fast": tiny(tokenizer, EngineConfig(deterministic=False))}
    workers = {name: EngineWorker(engine).start() for name, engine in engines.items()}
    with running_redis() as redis:
        publishers = {name: make_registration("decode", WorkerConfig(redis_url=redis.url, index_namespace="num",
                                                                     worker_id=name, registry_heartbeat_seconds=0.2),
                                              worker, port=1) for name, worker in workers.items()}
        try:
            for publisher in publishers.values():
                publisher.start()
                assert publisher.flush()
            gateway = Gateway(GatewayConfig(redis_url=redis.url, index_namespace="num"))
            # the block size the gateway hashes prompts with is a registered field, not parsed layout text
            listing = gateway.replicas.read_registry()
            assert {fields["block_size"] for _, fields in listing} == {str(engines["exact"].layout.block_size)}
            before, after = asyncio.run(health_before_and_after(gateway, publishers["fast"].stop))
        finally:
            for publisher in publishers.values():
                publisher.stop()
            for worker in workers.values():
                worker.stop()
    assert before == {"status": "ok", "replicas_up": 2, "numerics": {"batch-invariant": 1, "fast": 1},
                      "exactness_guaranteed": False}
    assert after == {"status": "ok", "replicas_up": 1, "numerics": {"batch-invariant": 1}, "exactness_guaranteed": True}


@needs_kernels
def test_the_fingerprint_names_the_instruction_set_of_batch_invariant_kernels(tokenizer, monkeypatch):
    """AVX-512, AVX2 and portable builds of the kernels sum in different orders: their blocks must never mix."""
    from kvcluster.model import kernels, llama

    engine = tiny(tokenizer, EngineConfig())
    isa = kernels.kernel_isa()
    assert isa in ("avx512-bf16", "avx512", "avx2", "portable")
    assert engine.identity.endswith(f"|batch-invariant/{isa}".encode())
    other_isa = "portable" if isa != "portable" else "avx512"
    monkeypatch.setattr(llama, "kernel_isa", lambda: other_isa)  # as a worker on another kind of CPU names it
    elsewhere = tiny(tokenizer, EngineConfig())
    assert elsewhere.fingerprint != engine.fingerprint
    fast = tiny(tokenizer, EngineConfig(deterministic=False))
    assert fast.identity.endswith(b"|fast")  # the fast kernels' bytes vary by batch anyway
