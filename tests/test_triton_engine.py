"""The engine's forward through the Triton kernels (the CUDA path), on a tiny random llama.

Without a GPU it runs under Triton's interpreter on CPU tensors (tests/conftest.py), with one on CUDA.
- Against the CPU engine (the compiled C++ kernels), same weights: the same greedy tokens and close
  logits. Not the same bits: the two kernel families sum in different orders (the fingerprint keeps
  their blocks apart: numerics_identity names the family).
- Within the Triton path, bit for bit: every sampled logit row of a prompt is the cold reference's
  when it is prefilled in 16-token chunks beside another prompt that shares its first two blocks
  (a mixed batch of chunks and decodes), and again warm, from its cached prefix.
The vocabulary is cut to 512 tokens (the interpreter pays per program: lm_head is then 4 of them);
float32 only here, bf16 and fp16 invariance is checked kernel by kernel in test_triton_kernels.py.
"""

import random
from dataclasses import replace

import pytest
import torch

from kvcluster.engine.engine import Engine, EngineConfig
from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.llama import LlamaModel, LlamaWeights
from tests.conftest import TINY_CONFIG

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = replace(TINY_CONFIG, vocab_size=512)
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
PROMPT_A = [random.Random(1).randrange(3, 512) for _ in range(40)]      # two full blocks and a tail
PROMPT_B = PROMPT_A[:32] + [random.Random(2).randrange(3, 512) for _ in range(6)]  # shares A's two blocks


def tiny_engine(tokenizer, device: str, kernels: str = "auto", **config) -> Engine:
    model = LlamaModel(CONFIG, LlamaWeights.random(CONFIG, seed=3), device, torch.float32, True, kernels=kernels)
    block_bytes = CONFIG.kv_layout(16, "float32").block_nbytes
    return Engine(model, tokenizer, b"tiny-triton", EngineConfig(kv_capacity_bytes=32 * block_bytes, **config))


def run(engine: Engine, prompts: dict[str, list[int]], use_cache: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """Every sampled logit row, by (request id, output index), of the prompts run together."""
    rows = {}

    def observe(seqs, logits):
        for seq, row in zip(seqs, logits):
            rows[(seq.request_id, len(seq.output_ids))] = row.cpu().clone()

    engine.logits_observer = observe
    seqs = [engine.add_request(p, GREEDY, name, use_cache=use_cache) for name, p in prompts.items()]
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    return rows


@pytest.fixture(scope="module")
def cold(tokenizer):
    """The Triton engine's reference: each prompt alone, nothing cached."""
    engine = tiny_engine(tokenizer, DEVICE, kernels="triton")
    assert engine.model.numerics == "batch-invariant" and "/triton-" in engine.model.numerics_identity
    return {**run(engine, {"a": PROMPT_A}, use_cache=False), **run(engine, {"b": PROMPT_B}, use_cache=False)}


def test_the_triton_forward_gives_the_cpu_kernels_tokens(tokenizer, cold):
    cpu = tiny_engine(tokenizer, "cpu")
    assert cpu.model.triton is None
    if cpu.model.numerics == "batch-invariant":  # the compiled kernels built here: another family, another identity
        assert cpu.model.numerics_identity != tiny_engine(tokenizer, DEVICE, kernels="triton").model.numerics_identity
    reference = run(cpu, {"a": PROMPT_A}, use_cache=False)
    assert reference.keys() == {key for key in cold if key[0] == "a"}
    for key, row in reference.items():
        assert row.argmax() == cold[key].argmax(), key
        torch.testing.assert_close(cold[key], row, rtol=1e-4, atol=1e-4)


def test_chunked_mixed_and_warm_rows_are_the_cold_bits(tokenizer, cold):
    engine = tiny_engine(tokenizer, DEVICE, kernels="triton", max_prefill_tokens=16)
    mixed = run(engine, {"a": PROMPT_A, "b": PROMPT_B})  # 16-token chunks of both, then decodes beside chunks
    assert mixed.keys() == cold.keys()
    for key in cold:
        assert torch.equal(mixed[key], cold[key]), key
    before = engine.tokens_computed
    warm = run(engine, {"a": PROMPT_A})  # its two full blocks come from the local prefix cache
    assert engine.tokens_computed - before == len(PROMPT_A) - 32
    for key, row in warm.items():
        assert torch.equal(row, cold[key]), key
