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
