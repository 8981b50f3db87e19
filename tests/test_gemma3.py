"""Gemma 3 against transformers: a tiny random checkpoint (Hugging Face directory and GGUF) whose
sliding window is shorter than the prompts, on every attention path; then the real Gemma 3 270M GGUF
(float32 on both sides, transformers' eager attention): greedy tokens in process, and cold and warm
through a cluster."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import openai
import pytest
import torch
import transformers

from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.model.config import layer_windows
from kvcluster.model.files import GGUFFile, read_model_config
from kvcluster.model.loader import load_model
from kvcluster.model.tokenizer import ChatMessage
from tests.test_models import (PROMPT, assert_matches_transformers, tiny_tokenizer,
                               write_gguf_tokenizer, write_tokenizer_files)

WINDOW = 12  # the tiny model's sliding window: far shorter than its test prompts
STEPS = 32
REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les trois mousquetaires sont",
    # Longer than the 512-token window: the windowed layers drop its start, the global ones do not.
    "Notes on caching. " + " ".join(f"Block {i} holds sixteen tokens of keys and values." for i in range(50)),
]


# ---- the tiny checkpoint ------------------------------------------------------------------------

def save_gemma3(directory: Path, tok, seed: int = 0) -> Path:
    config = transformers.Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        sliding_window=WINDOW, query_pre_attn_scalar=24, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # every weight random at unit scale; norms around 0 (Gemma multiplies by 1 + w)
        for _, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer_files(directory, tok)
    return directory


def write_gemma3_gguf(path: Path, hf_dir: Path, tok) -> Path:
    """The checkpoint as llama.cpp's converter writes a gemma3 GGUF: norms stored as 1 + w, Q/K rows
    as they are (NEOX rope), tied embedding, the sliding window as metadata."""
    raw = json.loads((hf_dir / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict().items()}
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(raw["num_hidden_layers"])
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_embedding_length(raw["hidden_size"])
    writer.add_feed_forward_length(raw["intermediate_size"])
    writer.add_head_count(raw["num_attention_heads"])
    writer.add_head_count_kv(raw["num_key_value_heads"])
    writer.add_key_length(raw["head_dim"])
    writer.add_value_length(raw["head_dim"])
    writer.add_rope_freq_base(raw["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    writer.add_sliding_window(raw["sliding_window"])
    write_gguf_tokenizer(writer, tok)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(raw["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w + 1 if "norm" in hf_name else w))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"] + 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> tuple[Path, Path]:
    """(Hugging Face directory, GGUF file) of one tiny random Gemma 3."""
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("gemma3")
    hf_dir = save_gemma3(root / "hf", tok)
    return hf_dir, write_gemma3_gguf(root / "tiny-gemma3.gguf", hf_dir, tok)


def test_tiny_gemma3_reads_its_config(tiny_gemma3):
    hf_dir, gguf_path = tiny_gemma3
    config = read_model_config(hf_dir)
    assert config.architecture == "gemma3"
    assert config.layer_windows == (WINDOW,) * 5 + (0, WINDOW)  # the sixth layer attends globally
    assert (config.rope_theta, config.local_rope_theta) == (1_000_000.0, 10_000.0)
    assert config.attention_scale == 1 / math.sqrt(24)
    gguf_config = read_model_config(gguf_path)
    # GGUF has no query_pre_attn_scalar: llama.cpp's rule (head_dim) applies; it stores eps in float32.
    assert gguf_config.attention_scale == 1 / math.sqrt(32) and gguf_config.rms_eps == pytest.approx(1e-6)
    unrounded = {"attention_scale": None, "rms_eps": None}
    assert {**vars(gguf_config), **unrounded} == {**vars(config), **unrounded}
    loaded = load_model(hf_dir)
    assert loaded.weights.lm_head is loaded.weights.embed and loaded.weights.layers[0].post_ffn_norm is not None


def test_tiny_gemma3_checkpoint_matches_transformers(tiny_gemma3):
    hf_dir, _ = tiny_gemma3
    assert_matches_transformers(hf_dir, hf_dir)


def test_tiny_gemma3_gguf_matches_transformers(tiny_gemma3, tmp_path):
    hf_dir, gguf_path = tiny_gemma3
    # The GGUF's attention scale is head_dim's (above): the reference gets the same.
    raw = json.loads((hf_dir / "config.json").read_text())
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    for file in hf_dir.iterdir():
        (reference_dir / file.name).write_bytes(file.read_bytes())
    (reference_dir / "config.json").write_text(json.dumps({**raw, "query_pre_attn_scalar": raw["head_dim"]}))
    assert_matches_transformers(gguf_path, reference_dir)


@pytest.mark.parametrize("path", ["batch-invariant", "fast", "torch"])
def test_tiny_gemma3_warm_equals_cold_on_every_attention_path(tiny_gemma3, path):
    """Prefix hits over windowed layers: the blocks a cold run cached give the same tokens, whichever
    attention plan (compiled op, fixed or adaptive key chunks; SDPA and padded torch paths) runs."""
    hf_dir, _ = tiny_gemma3
    engine = load_engine(hf_dir, "cpu", EngineConfig(kv_capacity_bytes=8 << 20, max_prefill_tokens=16,
                                                      deterministic=path == "batch-invariant"), "float32")
    if path == "torch":
        engine.model.paged_op = None
    prompt_ids = engine.tokenizer.encode_chat([ChatMessage("user", PROMPT)])
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reference = [e.token_id for e in engine.generate_no_cache(prompt_ids, greedy)]
    cold = [e.token_id for e in engine.generate(prompt_ids, greedy)]
    warm = [e.token_id for e in engine.generate(prompt_ids, greedy)]
    assert engine.blocks.num_cached >= len(prompt_ids) // 16
    assert cold == warm == reference
    batched = engine.generate_batch([prompt_ids, prompt_ids[:40], prompt_ids], greedy)
    assert batched[0] == batched[2] == reference


def test_layer_windows_follow_the_pattern_or_the_layer_types():
    assert layer_windows(12, 512) == (512,) * 5 + (0,) + (512,) * 5 + (0,)
    assert layer_windows(3, 8, ["full_attention", "sliding_attention", "full_attention"]) == (0, 8, 0)


# ---- the real model -----------------------------------------------------------------------------

# GGUF name -> transformers' name of each layer tensor; Gemma's norms are stored as 1 + w.
HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def transformers_gemma3(gemma3_path):
    """transformers' Gemma3ForCausalLM (float32, eager attention) over the GGUF's weights, dequantized by
    gguf's own code (GGUFFile.tensors). (transformers 5.23 cannot read this file itself: it lacks the Q5_0 type; gguf's
    GGUFReader takes ~10 s over the 262k-string vocabulary, so the header is read by GGUFFile, whose
    parsing tests/test_models.py and the tiny Gemma 3 GGUF above check against gguf's writer.)
    Its config is google/gemma-3-270m's: the file's sizes, query_pre_attn_scalar 256, rope bases 1e6
    and 1e4, every sixth layer global."""
    file = GGUFFile(gemma3_path)
    field = file.field
    config = transformers.Gemma3TextConfig(
        vocab_size=field("tokenizer.ggml.tokens"), hidden_size=field("gemma3.embedding_length"),  # a count: strings unread
        intermediate_size=field("gemma3.feed_forward_length"), num_hidden_layers=field("gemma3.block_count"),
        num_attention_heads=field("gemma3.attention.head_count"),
        num_key_value_heads=field("gemma3.attention.head_count_kv"), head_dim=field("gemma3.attention.key_length"),
        max_position_embeddings=field("gemma3.context_length"), sliding_window=field("gemma3.attention.sliding_window"),
        rms_norm_eps=1e-6, query_pre_attn_scalar=256, rope_theta=field("gemma3.rope.freq_base"),
        rope_local_base_freq=10000.0, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    state = {}
    for tensor_name, dequantized in file.tensors().items():  # by gguf.quants.dequantize
        weight = torch.tensor(dequantized())  # a copy: F32 tensors are read-only views of the file
        kind, layer = tensor_name.removesuffix(".weight"), None
        if kind.startswith("blk."):
            _, layer, kind = kind.split(".")
        name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}.get(kind) or f"model.layers.{layer}.{HF_NAMES[kind]}"
        state[name + ".weight"] = weight - 1 if kind.endswith("norm") else weight
    with transformers.initialization.no_init_weights():  # every weight is loaded below (strict but the tied head)
        model = transformers.Gemma3ForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = None  # always `STEPS` tokens, none suppressed (as ignore_eos)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied to the embedding
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def reference_tokens(model, prompt_ids: list[int], steps: int = STEPS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False, top_p=None,
                             top_k=None, temperature=None)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def real_prompts(gemma3_engine) -> list[list[int]]:
    tokenizer = gemma3_engine.tokenizer
    prompts = [tokenizer.encode_prompt(text) for text in REAL_PROMPTS]
    prompts.append(tokenizer.encode_chat([ChatMessage("user", "Name three colours.")]))
    assert len(prompts[3]) > 512 + 16 and all(p[0] == tokenizer.bos_id for p in prompts)
    return prompts


@pytest.fixture(scope="module")
def expected_real(transformers_gemma3, real_prompts) -> list[list[int]]:
    return [reference_tokens(transformers_gemma3, prompt) for prompt in real_prompts]


def test_gemma3_270m_greedy_equals_transformers(gemma3_engine, real_prompts, expected_real):
    greedy = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    assert gemma3_engine.generate_batch(real_prompts, greedy, use_cache=False) == expected_real
    assert gemma3_engine.model.config.layer_windows.count(0) == 3  # 18 layers: 15 windowed, 3 global
    assert all(len(set(tokens)) > 3 for tokens in expected_real)


def test_gemma3_270m_chat_template_and_stop_tokens(gemma3_engine):
    tokenizer = gemma3_engine.tokenizer
    text = tokenizer.render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", " Hi "),
                                  ChatMessage("assistant", "Hello."), ChatMessage("user", "Bye")])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id == 2 and ids.count(tokenizer.encode("<end_of_turn>")[0]) == 3
    assert tokenizer.stop_ids == {1, 106}  # <eos> and <end_of_turn>
    assert tokenizer.decode([2, 105, *tokenizer.encode("model")]) == "model"  # specials skipped


@pytest.mark.slow  # a multi-process cluster
def test_gemma3_270m_through_a_cluster_cold_and_warm(gemma3_path, gemma3_engine, real_prompts, expected_real):
    """`kvcluster up --model <file>`: the cold request computes and caches the long prompt's blocks, the
    warm one takes them from the cache; both give transformers' tokens. The gateway renders the chat
    template and stops at <end_of_turn>."""
    long_prompt, expected = real_prompts[3], expected_real[3]
    with Cluster(ClusterPorts.any_free(), dtype="float32", model=str(gemma3_path), gateway=True,
                 log_stream=open("/dev/null", "w"), start_timeout_s=400) as cluster:
        with Client(cluster.decode_target) as client:
            cold, warm = (client.generate(token_ids=long_prompt, max_tokens=STEPS, temperature=0.0, ignore_eos=True)
                          for _ in range(2))
        chat = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused").chat.completions.create(
            model=cluster.served_model, messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=STEPS, temperature=0.0)
    assert cold.usage.cached_tokens == 0 and warm.usage.cached_tokens >= len(long_prompt) - 16
    assert list(cold.token_ids) == list(warm.token_ids) == expected
    tokenizer = gemma3_engine.tokenizer
    chat_tokens = expected_real[4]
    stop = next((i for i, t in enumerate(chat_tokens) if t in tokenizer.stop_ids), len(chat_tokens))
    assert chat.choices[0].message.content == tokenizer.decode(chat_tokens[:stop])
    assert chat.choices[0].finish_reason == ("stop" if stop < len(chat_tokens) else "length")


def test_tokenize_counts_a_plain_prompt_as_a_completion_does_bos_included(gemma3_engine):
    """Gemma adds BOS to a plain prompt: /tokenize says so (as vLLM does), so its count is the
    completion's usage.prompt_tokens; add_special_tokens=false gives the bare text's ids."""
    import asyncio
    import json as json_module

    from starlette.requests import Request

    from gateway.openai_api import ModelLimits
    from gateway.tokenize import TokenizeEndpoints

    tokenizer = gemma3_engine.tokenizer
    endpoints = TokenizeEndpoints(tokenizer, ModelLimits("gemma3", 32768, tokenizer.vocab_size))

    def tokenize(body: dict) -> dict:
        async def receive():
            return {"type": "http.request", "body": json_module.dumps(body).encode()}

        response = asyncio.run(endpoints.tokenize(Request({"type": "http", "method": "POST", "headers": []}, receive)))
        return json_module.loads(response.body)

    text = "The lighthouse keeper counted the ships."
    assert tokenize({"prompt": text})["tokens"] == tokenizer.encode_prompt(text) == [tokenizer.bos_id, *tokenizer.encode(text)]
    assert tokenize({"prompt": text, "add_special_tokens": False})["tokens"] == tokenizer.encode(text)
    chat = tokenize({"messages": [{"role": "user", "content": text}]})["tokens"]
    assert chat == tokenizer.encode_chat([ChatMessage("user", text)]) and chat.count(tokenizer.bos_id) == 1
