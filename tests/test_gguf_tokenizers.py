"""The tokenizer a GGUF describes, against the model's own tokenizer, on multilingual, code and
emoji text: SmolLM2 and Gemma 3 (the shipped files), and tiny GGUFs written here from tokenizers of the
Llama 3, Qwen2 (byte-level BPE) and Mistral (SentencePiece) kinds. Anything else is refused by name."""

import io
import json
import unicodedata
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import transformers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from kvcluster.errors import UnsupportedModel
from kvcluster.model.files import default_model_path
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs; it's 2024-06-01 and they'll pay $1,234.56.",
    "日本語のテキストと中文文本，还有한국어. Ελληνικά, русский текст, العربية, हिन्दी, Tiếng Việt.",
    "Emoji: 🚀🔥👍🏽 and a family 👨‍👩‍👧, flags 🇫🇷🇯🇵, math ∑∫√∞.",
    "def f(x):\n    return {k: v for k, v in x.items() if v}  # code\n\ttabs\r\n\n\n  }\n",
    "   leading and trailing spaces   ",
    "Café, naïve, cafe\u0301 (decomposed), ﬁ ligature, full-width ＡＢＣ１２３.",
    "I'M SURE YOU'VE SEEN 'EM: don't, won't, y'all'd've, O'Neil's.",
    "x = 12345678901234567890; y = 3.14159e-10 ** 2\n\n",
]
# Llama 3's and Qwen2's split patterns, as their tokenizer.json files give them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = TEXTS + ["The capital of France is Paris. Blocks of 16 tokens are hashed in a chain.",
                  "Tokyo 東京 and Seoul 서울; numbers 1234567 and 89; emoji 😀😃😄.",
                  "return value; else: pass  # comments\n" * 3]


def write_tokenizer_gguf(path: Path, model: str, tokens: list[str], types: list[int], pre: str | None = None,
                         merges: list[str] | None = None, scores: list[float] | None = None,
                         bos: int = 1, eos: int = 2, add_bos: bool | None = None) -> Path:
    """A GGUF holding only a tokenizer (llama.cpp's keys), no tensors."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def byte_level_bpe(split: str, specials: list[str], nfc: bool = False) -> HFTokenizer:
    """A byte-level BPE with a family's split (as its tokenizer.json has it), trained here."""
    tok = HFTokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def byte_level_gguf(path: Path, tok: HFTokenizer, pre: str) -> Path:
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return write_tokenizer_gguf(path, "gpt2", [t for t, _ in vocab], [3 if t in specials else 1 for t, _ in vocab],
                                pre, merges)


def assert_same_ids(ours: Tokenizer, reference, texts=TEXTS, nfc: bool = False) -> None:
    """The same ids as `reference(text)` for every text, and the text back from them (in NFC when the
    tokenizer normalizes to it)."""
    for text in texts:
        assert ours.encode(text) == reference(text), text
        assert ours.decode(ours.encode(text), skip_special=False) == (unicodedata.normalize("NFC", text) if nfc else text)


@pytest.mark.parametrize("family, split, pre, nfc", [("llama3", LLAMA3_SPLIT, "llama-bpe", False),
                                                      ("qwen2", QWEN2_SPLIT, "qwen2", True)])
def test_byte_level_gguf_equals_the_families_tokenizer(tmp_path, family, split, pre, nfc):
    tok = byte_level_bpe(split, ["<|endoftext|>", "<|begin|>", "<|end|>"], nfc)
    tok.save(str(tmp_path / "tokenizer.json"))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = Tokenizer(read_tokenizer_data(byte_level_gguf(tmp_path / f"{family}.gguf", tok, pre)))
    assert_same_ids(ours, lambda text: reference(text, add_special_tokens=False)["input_ids"],
                    TEXTS + ["<|begin|>user: hi<|end|>"], nfc)
    assert ours.encode("<|end|>") == [2] and ours.special_ids == {0, 1, 2}
    # The split is the family's: another one (GPT-2's) would give other tokens for this text.
    wrong = Tokenizer(read_tokenizer_data(byte_level_gguf(tmp_path / "gpt2.gguf", tok, "gpt-2")))
    assert any(wrong.encode(text) != ours.encode(text) for text in TEXTS)


def test_sentencepiece_gguf_equals_sentencepiece(tmp_path):
    """Mistral's kind: a SentencePiece BPE with byte fallback (unseen characters become bytes), its
    scores ranking the merges, a space before the text; trained here as Llama 2's was configured.
    The reference is SentencePiece itself, as llama.cpp is: transformers 5 converts a bare
    tokenizer.model with other space rules (no prefix space before a text that starts with one)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=model, vocab_size=420,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = range(sp.get_piece_size())
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in pieces]
    path = write_tokenizer_gguf(tmp_path / "mistral.gguf", "llama", [sp.id_to_piece(i) for i in pieces], types,
                                "default", scores=[sp.get_score(i) for i in pieces])
    ours = Tokenizer(read_tokenizer_data(path))
    unseen = "Zebras 🦓 ẞ"  # characters the training text lacks: bytes
    assert_same_ids(ours, sp.encode, TEXTS + [" x", "a  b", "\n\nend", unseen])
    assert ours.encode("</s> x") == [sp.eos_id(), *sp.encode(" x")]  # a space prefix after a special token too
    assert sum(types[i] == 6 for i in ours.encode(unseen)) >= 4 + 3  # UTF-8 bytes of 🦓 and ẞ (at least)
    assert ours.add_bos and ours.encode_prompt("hi") == [sp.bos_id(), *sp.encode("hi")]


def test_smollm2_equals_its_published_tokenizer():
    """SmolLM2's tokenizer.json splits digits one by one before GPT-2's regex (its GGUF says
    pre=smollm): the reference is transformers' reading of the GGUF with that pre-tokenizer."""
    ours = Tokenizer(read_tokenizer_data(None))
    reference = transformers.AutoTokenizer.from_pretrained(default_model_path().parent,
                                                           gguf_file=default_model_path().name)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert_same_ids(ours, lambda text: reference(text, add_special_tokens=False)["input_ids"],
                    TEXTS + ["<|im_start|>user\nHi<|im_end|>"])
    assert len(ours.encode("12345")) == 5 and ours.special_ids == set(range(17))
    assert not ours.add_bos and ours.encode_prompt("hi") == ours.encode("hi")


def gemma_sentencepiece(data) -> spm.SentencePieceProcessor:
    """Google's SentencePiece over the GGUF's pieces, scores and types, configured as Gemma's
    tokenizer.model is (BPE, byte fallback, no normalization, no space before the text)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(data.tokens)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 3, 2, 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(data.tokens, data.scores, data.token_types):
        piece = proto.pieces.add()
        # llama.cpp's converter wrote Gemma's runs of spaces with real spaces; SentencePiece spells them ▁.
        piece.piece = "\u2581" * len(token) if " " in token and not token.strip() else token
        piece.score, piece.type = score, kind
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_gemma3_equals_sentencepiece(gemma3_path):
    data = read_tokenizer_data(gemma3_path)
    ours = Tokenizer(data)
    assert (data.model, data.pre, data.add_bos, data.add_space_prefix) == ("llama", "default", True, False)
    sp = gemma_sentencepiece(data)
    assert_same_ids(ours, sp.encode, TEXTS + ["  two spaces,\tand\n\nnew lines", "a\n\n\n\nb    c"])
    assert ours.encode("<start_of_turn>user\n") == [105, *sp.encode("user\n")]
    assert ours.encode_prompt("Hi") == [2, *sp.encode("Hi")]


@pytest.mark.parametrize("model, pre, refused", [("bert", None, "tokenizer model 'bert'"),
                                                  ("gpt2", "chatglm-bpe", "pre-tokenizer 'chatglm-bpe'")])
def test_other_tokenizers_are_refused_by_name(tmp_path, model, pre, refused):
    path = write_tokenizer_gguf(tmp_path / "other.gguf", model, ["<unk>", "<s>", "</s>", "a"], [2, 3, 3, 1], pre,
                                merges=[])
    with pytest.raises(UnsupportedModel, match=refused):
        Tokenizer(read_tokenizer_data(path))
