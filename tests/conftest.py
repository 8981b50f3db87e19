"""Shared fixtures: the real SmolLM2 and Gemma 3 engines (each loaded once) and a seeded tiny llama."""

from pathlib import Path

import os

import pytest
import torch

# Without a GPU the Triton kernels' tests (tests/test_triton_*.py) execute them on CPU tensors under
# Triton's interpreter. Triton reads this when a kernel is defined, so it is set here, before any test
# module can import kvcluster.model.triton_kernels; on a CUDA machine they compile and run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcluster.engine.engine import Engine, EngineConfig, load_engine, random_engine
from kvcluster.model.config import ModelConfig
from kvcluster.model.files import default_model_path
from kvcluster.model.gguf_loader import load_gguf
from kvcluster.model.shipped import gemma3_path as shipped_gemma3_path
from kvcluster.model.tokenizer import Tokenizer

TINY_CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                          intermediate_size=128, vocab_size=49152, rope_theta=10000.0, rms_eps=1e-5,
                          context_length=512)


@pytest.fixture(scope="session")
def triton_interpreter():
    """Under the interpreter, tl.dot in the CUDA backend's FMA order (see tests/triton_interpreter.py)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from tests.triton_interpreter import dot_in_fma_order

        dot_in_fma_order()


@pytest.fixture(scope="session")
def smollm_gguf():
    return load_gguf(default_model_path())


@pytest.fixture(scope="session")
def tokenizer(smollm_gguf) -> Tokenizer:
    return Tokenizer(smollm_gguf.tokenizer)


@pytest.fixture(scope="session")
def smollm_engine() -> Engine:
    return load_engine(device="cpu", dtype="float32", config=EngineConfig(kv_capacity_bytes=192 << 20))


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The Gemma 3 270M GGUF `make install` ships (about 250 MB, Q4_K_M)."""
    return shipped_gemma3_path()


@pytest.fixture(scope="session")
def gemma3_engine(gemma3_path) -> Engine:
    """Gemma 3 270M in float32 (about 1.5 GB with the packed weights): loaded once per session."""
    return load_engine(gemma3_path, device="cpu", dtype="float32", config=EngineConfig(kv_capacity_bytes=128 << 20))


def make_tiny_engine(tokenizer: Tokenizer, kv_blocks: int = 1024, **engine_kwargs) -> Engine:
    block_bytes = TINY_CONFIG.kv_layout(16, "float32").block_nbytes
    config = EngineConfig(kv_capacity_bytes=kv_blocks * block_bytes, **engine_kwargs)
    return random_engine(TINY_CONFIG, tokenizer, seed=1234, engine_config=config)


@pytest.fixture
def tiny_engine(tokenizer) -> Engine:
    return make_tiny_engine(tokenizer)
