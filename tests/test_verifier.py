"""The live verifier (`--verify-fraction`) and `kvcluster verify`, on a real decode server (its own
local cache is the cached tier here) with batch-invariant numerics (the default)."""

import logging

import pytest
from prometheus_client import CollectorRegistry

from decode_service.config import DecodeConfig
from decode_service.server import create_server
from kvcluster.cli import main as cli
from kvcluster.cli.polling import wait_until
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.errors import InvalidArgument
from kvcluster.kv.blocks import prefix_hashes
from kvcluster.model.tokenizer import ChatMessage

PROMPT = ("The verifier recomputes a warm request without the cache and compares every token and every block. "
          "A corrupt block must be named. ") * 3
OTHER = "A different document, so that nothing it shares with PROMPT's corrupted blocks is reused. " * 4
GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server():
    engine = load_engine(device="cpu", dtype="float32", config=EngineConfig(kv_capacity_bytes=96 << 20))
    registry = CollectorRegistry()
    decode, port = create_server(DecodeConfig(port=0, metrics_port=-1, redis_url="", prefill_target="",
                                              verify_fraction=1.0), engine=engine, registry=registry)
    decode.start()
    yield decode, port, registry
    decode.stop(0.5)


def verified(registry: CollectorRegistry, result: str, at_least: float) -> float:
    """The verifier's count for `result`, once it reaches `at_least` (it runs in the background, on
    this process's cores: polled, not spun, so it is not starved of the GIL)."""
    def value() -> float:
        return registry.get_sample_value("kvcluster_verify_total", {"result": result}) or 0.0

    wait_until(lambda: value() >= at_least, 120)
    return value()


def corrupt_cached_block(decode, prompt_ids: list[int], index: int) -> None:
    engine = decode.generator.worker.engine

    def corrupt(engine) -> None:
        hashes = prefix_hashes(engine.fingerprint, prompt_ids, engine.config.block_size)
        slot = engine.blocks.slot_of(hashes[index])
        assert slot is not None
        engine.pool.kv[slot].fill_(7.0)

    decode.generator.worker.call(corrupt)
    assert engine.model.numerics == "batch-invariant"


def test_warm_requests_are_recomputed_and_match(server):
    decode, port, registry = server
    before = verified(registry, "match", 0)
    with Client(f"127.0.0.1:{port}") as client:
        cold, warm = (client.generate(messages=[("user", "A fresh question about verification?")], **GREEDY)
                      for _ in range(2))
    assert cold.usage.local_cache_tokens == 0 and warm.usage.local_cache_tokens > 0
    assert verified(registry, "match", before + 1) == before + 1  # only the warm one is verified
    assert registry.get_sample_value("kvcluster_verify_mismatch_total") == 0


class Lines(logging.Handler):
    """The verifier's log lines, heard on its own logger (whatever the root logger's set-up)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_corrupt_cached_block_is_caught_and_named(server):
    decode, port, registry = server
    tokenizer = decode.generator.worker.engine.tokenizer
    prompt_ids = tokenizer.encode_chat([ChatMessage("user", PROMPT)])
    assert len(prompt_ids) > 4 * 16
    logger, lines = logging.getLogger("decode_service.verifier"), Lines()
    logger.addHandler(lines)
    logger.disabled = False
    try:
        with Client(f"127.0.0.1:{port}") as client:
            client.generate(token_ids=prompt_ids, **GREEDY)
            corrupt_cached_block(decode, prompt_ids, 2)
            warm = client.generate(token_ids=prompt_ids, **GREEDY)
            assert warm.usage.local_cache_tokens > 2 * 16
            assert verified(registry, "mismatch", 1) == 1  # counted after its log line is written
    finally:
        logger.removeHandler(lines)
    assert registry.get_sample_value("kvcluster_verify_mismatch_total") == 1
    assert any("first differs in block 2 (tokens 32-47)" in line for line in lines.lines), lines.lines


def test_kvcluster_verify_passes_on_a_healthy_cluster_and_fails_on_a_corrupt_cache(server, tmp_path, capsys):
    decode, port, _ = server
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do caches stay exact?\n\n" + OTHER + "\n")
    args = ["verify", "--target", f"127.0.0.1:{port}", "--prompts", str(prompts), "--max-tokens", "6"]
    assert cli.main(args) == 0
    assert "2/2 prompts identical cold, warm and uncached" in capsys.readouterr().out
    tokenizer = decode.generator.worker.engine.tokenizer
    corrupt_cached_block(decode, tokenizer.encode_chat([ChatMessage("user", OTHER)]), 1)
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "MISMATCH  #2" in out and "1/2 prompts identical" in out


def test_verify_fraction_out_of_range_is_refused():
    with pytest.raises(InvalidArgument, match="verify_fraction"):
        DecodeConfig(verify_fraction=1.5)
