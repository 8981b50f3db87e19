"""Chained block hashes and fingerprints."""

from kvcluster.kv.blocks import HASH_BYTES, checksum, make_fingerprint, prefix_hashes
from kvcluster.kv.pool import KVLayout

LAYOUT = KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64)
FP = make_fingerprint(b"model-a", LAYOUT.canonical())


def test_same_prefix_same_hashes():
    a = prefix_hashes(FP, list(range(100)), 16)
    b = prefix_hashes(FP, list(range(64)) + [999] * 36, 16)
    assert len(a) == 6 and all(len(h) == HASH_BYTES for h in a)
    assert a[:4] == b[:4]
    assert a[4:] != b[4:]


def test_partial_tail_block_has_no_hash():
    assert len(prefix_hashes(FP, list(range(15)), 16)) == 0
    assert len(prefix_hashes(FP, list(range(33)), 16)) == 2


def test_any_token_change_changes_every_later_hash():
    tokens = list(range(80))
    base = prefix_hashes(FP, tokens, 16)
    changed = prefix_hashes(FP, tokens[:20] + [tokens[20] + 1] + tokens[21:], 16)
    assert changed[0] == base[0]
    assert all(x != y for x, y in zip(base[1:], changed[1:]))


def test_fingerprint_change_changes_every_hash():
    tokens = list(range(64))
    others = [
        make_fingerprint(b"model-b", LAYOUT.canonical()),
        make_fingerprint(b"model-a", KVLayout(30, 16, 3, 64, "float16").canonical()),
        make_fingerprint(b"model-a", KVLayout(30, 32, 3, 64).canonical()),
        make_fingerprint(b"model-a", KVLayout(30, 16, 3, 64, version=2).canonical()),
    ]
    base = prefix_hashes(FP, tokens, 16)
    for fp in others:
        assert fp != FP
        assert all(x != y for x, y in zip(base, prefix_hashes(fp, tokens, 16)))


def test_layout_sizes_match_model_facts():
    assert LAYOUT.token_nbytes == 46_080
    assert LAYOUT.block_nbytes == 737_280


def test_checksum_detects_a_flipped_byte():
    payload = bytearray(b"\x01" * 1000)
    before = checksum(payload)
    payload[500] ^= 0x10
    assert checksum(payload) != before
