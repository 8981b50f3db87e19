"""Tokenizer built from the GGUF vocabulary: round trips, special tokens, chat template, streaming, and
its fingerprint."""

from dataclasses import replace

import pytest

from kvcluster.errors import InvalidArgument
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import ChatMessage, IncrementalDetokenizer, Tokenizer, tokenizer_fingerprint

SAMPLES = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 🚀🔥👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n    return {k: v for k, v in x.items() if v}  # code\n\ttabs\r\n",
    "   leading and trailing spaces   ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_digits_are_split_and_words_merge(tokenizer):
    assert len(tokenizer.encode("12345")) == 5
    assert len(tokenizer.encode(" the")) == 1


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.encode("<|im_start|>") == [tokenizer.bos_id]
    assert tokenizer.encode("<|im_end|>") == [tokenizer.eos_id]
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi")]) == "hi"
    assert tokenizer.decode([tokenizer.bos_id], skip_special=False) == "<|im_start|>"


def test_chat_template(tokenizer):
    text = tokenizer.render_chat([ChatMessage("user", "Hi there")])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    own_system = tokenizer.render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert own_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    ids = tokenizer.encode_chat([ChatMessage("user", "Hi there")])
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.eos_id) == 2


def test_chat_rejects_unknown_role_and_empty(tokenizer):
    with pytest.raises(InvalidArgument, match=r"messages\[1\]\.role"):
        tokenizer.render_chat([ChatMessage("user", "a"), ChatMessage("wizard", "b")])
    with pytest.raises(InvalidArgument, match="messages"):
        tokenizer.render_chat([])


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_detokenizer_never_splits_characters(tokenizer, text):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"))
    deltas = [detok.push(t) for t in tokenizer.encode(text)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_fingerprint_is_the_same_across_loads_and_differs_for_another_tokenizer(tokenizer, gemma3_path):
    # the worker's tokenizer came through the weights' loader, the gateway's from the files alone
    gateway_side = read_tokenizer_data()
    assert Tokenizer(gateway_side).fingerprint == tokenizer.fingerprint == tokenizer_fingerprint(read_tokenizer_data())
    changed = [replace(gateway_side, chat_template="{{ messages[0]['content'] }}"),
               replace(gateway_side, add_bos=True),
               replace(gateway_side, eos_id=gateway_side.bos_id),
               replace(gateway_side, merges=gateway_side.merges[:-1]),
               replace(gateway_side, tokens=[*gateway_side.tokens[:-1], "<|other|>"]),
               read_tokenizer_data(gemma3_path)]
    fingerprints = {tokenizer_fingerprint(data) for data in changed}
    assert len(fingerprints) == len(changed) and tokenizer.fingerprint not in fingerprints


# ---- the build cache (KVC_CACHE_DIR): a later start reads what an earlier one built -------------------

def test_a_built_tokenizer_is_cached_and_read_back_unchanged(tmp_path, monkeypatch):
    from kvcluster.model import tokenizer as module

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path))
    data = read_tokenizer_data()
    built = Tokenizer(data)
    entry = tmp_path / "tokenizers" / f"{built.fingerprint}.json"
    assert entry.is_file() and [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left

    def no_build(_):
        raise AssertionError("built again although the cache holds it")

    monkeypatch.setattr(module, "gguf_tokenizer", no_build)
    cached = Tokenizer(data)
    assert cached.to_json() == built.to_json()
    for text in SAMPLES:
        assert cached.encode(text) == built.encode(text) and cached.decode(cached.encode(text)) == text


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not json"])
def test_a_damaged_cache_entry_is_rebuilt_never_used(tmp_path, monkeypatch, damage):
    from kvcluster.model import tokenizer as module

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path))
    data = read_tokenizer_data()
    good = Tokenizer(data)
    entry = tmp_path / "tokenizers" / f"{good.fingerprint}.json"
    raw = entry.read_bytes()
    target = raw.index(b'"Hello"') + 1 if b'"Hello"' in raw else len(raw) // 2  # a vocabulary string
    entry.write_bytes({"flipped byte": raw[:target] + bytes([raw[target] ^ 0x01]) + raw[target + 1:],
                       "truncated": raw[:len(raw) // 2],
                       "not json": b"x\n{"}[damage])
    builds = []
    real_build = module.gguf_tokenizer
    monkeypatch.setattr(module, "gguf_tokenizer", lambda d: builds.append(1) or real_build(d))
    again = Tokenizer(data)
    assert builds == [1]
    assert again.to_json() == good.to_json() and entry.read_bytes() == raw  # the entry is whole again


def test_no_cache_when_kvc_cache_dir_is_empty_or_unwritable(tmp_path, monkeypatch):
    data = read_tokenizer_data()
    monkeypatch.setenv("KVC_CACHE_DIR", "")
    monkeypatch.chdir(tmp_path)
    assert Tokenizer(data).encode(SAMPLES[0]) and list(tmp_path.iterdir()) == []
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("KVC_CACHE_DIR", str(blocked))
    assert Tokenizer(data).decode(Tokenizer(data).encode(SAMPLES[1])) == SAMPLES[1]
