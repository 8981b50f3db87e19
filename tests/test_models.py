"""Every supported architecture against transformers: tiny random checkpoints made here (Hugging Face
directories with save_pretrained, GGUF with the gguf writer), greedy tokens and logits compared."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.client import Client
from kvcluster.engine.engine import EngineConfig, load_engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import UnsupportedModel
from kvcluster.model.config import hf_config, llama3_freq_factors
from kvcluster.model.files import read_model_config
from kvcluster.model.hf_loader import checkpoint_digest
from kvcluster.model.llama import DecodeSeq, PrefillSeq
from kvcluster.model.loader import load_model
from kvcluster.model.tokenizer import ChatMessage

STEPS = 32
CHUNK = 16  # the engine's prefill chunk in these tests: the prompt below is longer
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The capital of France is Paris.", "KV caches hold keys and values of every past token.",
          "Blocks of 16 tokens are hashed in a chain; a hit is pulled, a miss is computed.",
          "def forward(x): return x @ w.T  # 1234567890"] * 4
PROMPT = "A cache hit must never change a single output token, whatever the model. " * 2
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {  # name: (config class, settings beyond SMALL, save_pretrained extras, checkpoint dtype)
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False), {}, torch.float32),
    "llama3-rope-scaling-tied": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
                                 {}, torch.float32),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False), {}, torch.float32),
    "qwen2-biases-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True), {}, torch.float32),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False), {}, torch.float32),
    "llama-sharded": (transformers.LlamaConfig, dict(tie_word_embeddings=False), {"max_shard_size": "40KB"},
                      torch.float32),
    "qwen2-bf16": (transformers.Qwen2Config, dict(tie_word_embeddings=False), {}, torch.bfloat16),
}


# ---- tiny checkpoints ---------------------------------------------------------------------------

def tiny_tokenizer() -> HFTokenizer:
    """A byte-level BPE of a few hundred tokens, trained here (deterministic, offline); ChatML specials."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer_files(directory: Path, tok: HFTokenizer) -> None:
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": CHATML}))


def save_checkpoint(directory: Path, variant: str, tok: HFTokenizer, seed: int = 0) -> Path:
    config_class, settings, save_extras, dtype = VARIANTS[variant]
    config = config_class(vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2, **SMALL, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # every weight random at unit scale (norms and biases too: none hides behind 1 or 0)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.to(dtype).save_pretrained(directory, safe_serialization=True, **save_extras)
    write_tokenizer_files(directory, tok)
    return directory


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_checkpoint(root / name, name, tok, seed) for seed, name in enumerate(VARIANTS)}


# ---- the comparison -----------------------------------------------------------------------------

def reference(directory: Path, prompt_ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and each step's last-position logits, float32, no KV cache."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids, logits = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(STEPS):
            logits.append(model(torch.tensor([ids])).logits[0, -1].float())
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt_ids):], logits


def engine_logits(engine, prompt_ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The engine's model through the paged pool: the prompt prefilled in CHUNK-token pieces, then
    one decode step per given token (the reference's, so each step's logits compare one to one)."""
    bs = engine.config.block_size
    table = engine.blocks.allocate(-(-(len(prompt_ids) + len(tokens)) // bs))
    try:
        for start in range(0, len(prompt_ids), CHUNK):
            out = engine.model.prefill(engine.pool.kv, [PrefillSeq(prompt_ids[start:start + CHUNK], start, table)])
        logits = [out[0]]
        for i, token in enumerate(tokens[:-1]):
            logits.append(engine.model.decode(engine.pool.kv, [DecodeSeq(token, len(prompt_ids) + i, table)])[0])
        return logits
    finally:
        engine.blocks.free(table)


def tiny_engine(path: Path, dtype: str = "float32"):
    return load_engine(path, "cpu", EngineConfig(kv_capacity_bytes=8 << 20, max_prefill_tokens=CHUNK), dtype)


def assert_matches_transformers(model_path: Path, reference_dir: Path) -> None:
    engine = tiny_engine(model_path)
    prompt_ids = engine.tokenizer.encode_chat([ChatMessage("user", PROMPT)])
    assert len(prompt_ids) > 2 * CHUNK
    want_tokens, want_logits = reference(reference_dir, prompt_ids)
    greedy = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    assert [e.token_id for e in engine.generate(prompt_ids, greedy)] == want_tokens
    for step, (got, want) in enumerate(zip(engine_logits(engine, prompt_ids, want_tokens), want_logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert len(set(want_tokens)) > 1  # a model stuck on one token would prove little


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_checkpoint_matches_transformers(checkpoints, variant):
    assert_matches_transformers(checkpoints[variant], checkpoints[variant])


def test_what_each_variant_loads_as(checkpoints):
    loaded = {name: load_model(path) for name, path in checkpoints.items()}
    assert [name for name, m in loaded.items() if m.weights.lm_head is m.weights.embed] == [
        "llama3-rope-scaling-tied", "qwen2-biases-tied"]
    assert {name for name, m in loaded.items() if m.weights.layers[0].qkv_bias is not None} == {
        "qwen2-biases-tied", "qwen2-bf16"}
    assert [name for name, m in loaded.items() if m.weights.layers[0].qk_norm is not None] == ["qwen3-qk-norm"]
    assert loaded["qwen3-qk-norm"].config.head_dim == 32 != SMALL["hidden_size"] // SMALL["num_attention_heads"]
    assert loaded["qwen2-bf16"].weights.embed.dtype == torch.bfloat16
    assert len(list(checkpoints["llama-sharded"].glob("*.safetensors"))) > 3
    factors = loaded["llama3-rope-scaling-tied"].config.rope_freq_factors
    assert factors[0] == 1.0 and factors[-1] == LLAMA3_ROPE["factor"]  # the scaling does change frequencies
    assert {m.config.architecture for m in loaded.values()} == {"llama", "mistral", "qwen2", "qwen3"}


# ---- GGUF ----------------------------------------------------------------------------------------


def write_gguf_tokenizer(writer, tok) -> None:
    """The tiny byte-level BPE tokenizer as GGUF metadata (gpt2 model, SmolLM's pre-tokenizer: it
    splits digits one by one as the tiny tokenizer does), BOS 1, EOS 2 and the ChatML template."""
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)


def write_gguf(path: Path, hf_dir: Path, tok: HFTokenizer, rope_scaling: gguf.RopeScalingType | None = None) -> Path:
    """The HF checkpoint as llama.cpp's converter would write it: Q/K rows permuted for interleaved
    rotary, Llama 3 scaling as a rope_freqs tensor, the tokenizer as a GGUF vocabulary."""
    raw = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = raw["num_attention_heads"], raw["num_key_value_heads"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(raw["num_hidden_layers"])
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_embedding_length(raw["hidden_size"])
    writer.add_feed_forward_length(raw["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(raw["head_dim"])
    writer.add_rope_freq_base(raw["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    if rope_scaling is not None:
        writer.add_rope_scaling_type(rope_scaling)
    write_gguf_tokenizer(writer, tok)

    def permute(w: np.ndarray, n: int) -> np.ndarray:
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(raw["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            w = permute(w, heads) if gguf_name == "attn_q" else permute(w, kv_heads) if gguf_name == "attn_k" else w
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not raw["tie_word_embeddings"]:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    rope = raw["rope_parameters"]
    if rope["rope_type"] == "llama3":
        factors = llama3_freq_factors(rope["rope_theta"], raw["head_dim"], rope["factor"], rope["low_freq_factor"],
                                      rope["high_freq_factor"], rope["original_max_position_embeddings"])
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("variant", ["llama", "llama3-rope-scaling-tied"])
def test_gguf_matches_transformers(checkpoints, tok, tmp_path, variant):
    path = write_gguf(tmp_path / f"{variant}.gguf", checkpoints[variant], tok)
    assert_matches_transformers(path, checkpoints[variant])
    gguf_engine, hf_engine = tiny_engine(path), tiny_engine(checkpoints[variant])
    assert gguf_engine.tokenizer.encode(PROMPT) == hf_engine.tokenizer.encode(PROMPT)
    assert gguf_engine.fingerprint != hf_engine.fingerprint  # different files: blocks never shared


# ---- the weights build cache (KVC_CACHE_DIR/weights): a later start maps what an earlier one dequantized

def weights_entries(cache: Path) -> list[Path]:
    return sorted((cache / "weights").iterdir())


def assert_same_weights(a, b) -> None:
    named_a, named_b = a.named_tensors(), b.named_tensors()
    assert named_a.keys() == named_b.keys()
    assert all(torch.equal(named_a[k], named_b[k]) and named_a[k].dtype == named_b[k].dtype for k in named_a)
    assert (a.lm_head is a.embed) == (b.lm_head is b.embed)


@pytest.mark.parametrize("variant", ["llama", "llama3-rope-scaling-tied"])
def test_dequantized_gguf_weights_are_cached_and_read_back_bitwise(checkpoints, tok, tmp_path, monkeypatch, variant):
    from kvcluster.model import gguf_loader

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / f"{variant}.gguf", checkpoints[variant], tok)
    fresh = load_model(path)
    (entry,) = weights_entries(tmp_path / "cache")  # one entry, no temporary left
    assert entry.name.startswith(fresh.digest.hex())

    def no_dequantization(*_):
        raise AssertionError("dequantized again although the cache holds the weights")

    monkeypatch.setattr(gguf_loader, "_read_weights", no_dequantization)
    cached = load_model(path)
    assert_same_weights(cached.weights, fresh.weights)
    assert (cached.digest, cached.config) == (fresh.digest, fresh.config)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "header garbage"])
def test_a_damaged_weights_entry_is_dequantized_again_never_used(checkpoints, tok, tmp_path, monkeypatch, damage):
    from kvcluster.model import gguf_loader

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "llama.gguf", checkpoints["llama"], tok)
    good = load_model(path)
    (entry,) = weights_entries(tmp_path / "cache")
    raw = entry.read_bytes()
    entry.write_bytes({"flipped byte": raw[:-5] + bytes([raw[-5] ^ 0x01]) + raw[-4:],  # a tensor's byte
                       "truncated": raw[:len(raw) // 2],
                       "header garbage": b"\xff" * 64 + raw[64:]}[damage])
    dequantized = []
    real = gguf_loader._read_weights
    monkeypatch.setattr(gguf_loader, "_read_weights", lambda *a: dequantized.append(1) or real(*a))
    again = load_model(path)
    assert dequantized == [1]
    assert_same_weights(again.weights, good.weights)
    monkeypatch.setattr(gguf_loader, "_read_weights", None)  # the entry is whole again: read, not rebuilt
    assert_same_weights(load_model(path).weights, good.weights)


def test_no_weights_entry_when_the_cache_is_off_unwritable_or_the_disk_short(checkpoints, tok, tmp_path, monkeypatch):
    from kvcluster.model import build_cache

    path = write_gguf(tmp_path / "llama.gguf", checkpoints["llama"], tok)
    monkeypatch.setenv("KVC_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    reference = load_model(path)
    assert sorted(tmp_path.iterdir()) == before
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("KVC_CACHE_DIR", str(blocked))
    assert_same_weights(load_model(path).weights, reference.weights)
    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build_cache, "FREE_MARGIN", 1 << 62)  # no disk has that much free
    assert_same_weights(load_model(path).weights, reference.weights)
    assert list((tmp_path / "cache" / "weights").iterdir()) == []


def test_gguf_of_another_architecture_or_rope_scaling_is_refused(checkpoints, tok, tmp_path):
    path = write_gguf(tmp_path / "linear.gguf", checkpoints["llama"], tok, gguf.RopeScalingType.LINEAR)
    with pytest.raises(UnsupportedModel, match="rope scaling 'linear'"):
        load_model(path)
    writer = gguf.GGUFWriter(tmp_path / "qwen2.gguf", "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="GGUF architecture 'qwen2' is not supported; supported: llama"):
        load_model(tmp_path / "qwen2.gguf")


# ---- configs, errors, identity -------------------------------------------------------------------

def test_transformers_4_style_config_reads_the_same(checkpoints, tmp_path):
    source = checkpoints["llama3-rope-scaling-tied"]
    raw = json.loads((source / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_model_config(tmp_path) == read_model_config(source)


def write_config(directory: Path, **raw) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**SMALL, "vocab_size": 360, **raw}))
    return directory


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    path = write_config(tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModel) as err:
        load_model(path)
    message = str(err.value)
    assert "'gpt2'" in message and "GPT2LMHeadModel" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message
    with pytest.raises(UnsupportedModel, match="rope scaling 'yarn'"):
        read_model_config(write_config(tmp_path / "yarn", model_type="llama",
                                       rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(UnsupportedModel, match="without config.json"):
        load_model(tmp_path)


def test_weights_the_forward_cannot_use_are_refused(tok, tmp_path):
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), mlp_bias=True, **SMALL)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    write_tokenizer_files(tmp_path, tok)
    with pytest.raises(UnsupportedModel, match="no place for.*mlp.*bias"):
        load_model(tmp_path)


def test_sliding_window_caps_the_context():
    raw = {**SMALL, "vocab_size": 360, "model_type": "mistral", "sliding_window": 64}
    assert hf_config(raw).context_length == 64
    assert hf_config({**raw, "model_type": "qwen2", "use_sliding_window": False}).context_length == 256


def test_checkpoint_digest_tracks_weights_not_location(checkpoints, tok, tmp_path):
    source = checkpoints["llama"]
    copy = shutil.copytree(source, tmp_path / "copy")
    assert checkpoint_digest(copy) == checkpoint_digest(source)
    other = save_checkpoint(tmp_path / "other-seed", "llama", tok, seed=1)
    assert checkpoint_digest(other) != checkpoint_digest(source)
    # One sampled byte range changed (the last bytes of the data): another digest.
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_digest(copy) != checkpoint_digest(source)
    fingerprints = {tiny_engine(source).fingerprint, tiny_engine(other).fingerprint,
                    tiny_engine(source, "bfloat16").fingerprint, tiny_engine(checkpoints["mistral"]).fingerprint}
    assert len(fingerprints) == 4


def test_chat_template_renders_as_transformers_does(checkpoints):
    path = checkpoints["qwen3-qk-norm"]
    ours = tiny_engine(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "What is 12+30?")]
    want = theirs.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                      add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == want
    assert ours.encode_chat(messages) == theirs(want, add_special_tokens=False)["input_ids"]
    assert ours.eos_id == theirs.eos_token_id == 2 and ours.decode(ours.encode(PROMPT)) == PROMPT


# ---- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow  # a multi-process cluster
def test_cluster_serves_a_checkpoint_directory_warm_equals_cold(checkpoints):
    path = checkpoints["qwen3-qk-norm"]
    messages = [("system", PROMPT), ("user", "And the next token?")]
    with Cluster(ClusterPorts.any_free(), dtype="float32", model=str(path), log_stream=open("/dev/null", "w"),
                 start_timeout_s=240) as cluster:
        assert "--head-dim" in cluster.children["cache_store"].args
        with Client(cluster.decode_target) as client:
            cold, warm = (client.generate(messages=messages, max_tokens=12, temperature=0.0, ignore_eos=True)
                          for _ in range(2))
    engine = tiny_engine(path)
    prompt_ids = engine.tokenizer.encode_chat([ChatMessage(r, c) for r, c in messages])
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected_ids = [e.token_id for e in engine.generate_no_cache(prompt_ids, greedy)]
    assert cold.usage.cached_tokens == 0 and warm.usage.cached_tokens >= 32
    assert list(cold.token_ids) == list(warm.token_ids) == expected_ids
