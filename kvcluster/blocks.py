"""Block identity: chained xxh3-128 hashes of full token blocks under a model fingerprint.

hash_i = xxh3_128(fingerprint || hash_{i-1} || token ids of block i as little-endian uint32),
with hash_{-1} = 16 zero bytes. The fingerprint covers the model file, dtype, block size and KV
layout version, so incompatible workers can never share a block.

The cluster secret (the internal token) is mixed into the fingerprint through a key derived
from it (`fingerprint_key`). Without the secret nobody can compute which key a popular
prompt's blocks live under, so nobody can probe the stores or the index for it, nor plant a
block under it. The fingerprint is the right place: every block hash already chains it in, it
is never sent to Generate clients (it travels only on internal RPCs, which need the token), and
workers of one cluster share the token, hence the fingerprint, while a worker with another
token gets another fingerprint whose blocks never collide with ours. A cluster without a token
keeps the unkeyed fingerprint. The key is HMAC-SHA256 of a fixed label under the secret, so the
fingerprint reveals nothing about the token even to someone who sees it.
"""

import hashlib
import hmac
from collections.abc import Sequence
from typing import NewType

import numpy as np
import xxhash

BlockHash = NewType("BlockHash", bytes)
Fingerprint = NewType("Fingerprint", bytes)

HASH_BYTES = 16
ROOT_HASH = BlockHash(bytes(HASH_BYTES))
FINGERPRINT_KEY_LABEL = b"kvcluster/v1 fingerprint key"


def hash_block(fingerprint: Fingerprint, parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The chained hash of one block given its parent's hash."""
    h = xxhash.xxh3_128()
    h.update(fingerprint)
    h.update(parent)
    h.update(np.asarray(token_ids, dtype="<u4").tobytes())
    return BlockHash(h.digest())


def prefix_hashes(fingerprint: Fingerprint, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids` (a partial tail block gets none)."""
    hashes: list[BlockHash] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(fingerprint, parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


def checksum(payload: bytes | memoryview) -> int:
    """xxh3-64 of a block's bytes; travels with the block and is verified on push and pull."""
    return xxhash.xxh3_64_intdigest(payload)


def fingerprint_key(cluster_secret: str) -> bytes:
    """The key a cluster mixes into its fingerprint, derived from its secret; b"" without one."""
    if not cluster_secret:
        return b""
    return hmac.new(cluster_secret.encode(), FINGERPRINT_KEY_LABEL, hashlib.sha256).digest()


def make_fingerprint(model_digest: bytes, layout_canonical: str, cluster_key: bytes = b"") -> Fingerprint:
    """Identity of (model file, dtype, block size, KV layout, cluster key): blocks are shared only
    under an equal one. Without a key it is the fingerprint of a cluster that has no secret."""
    material = model_digest + b"|" + layout_canonical.encode()
    if cluster_key:
        material += b"|" + cluster_key
    return Fingerprint(xxhash.xxh3_128_digest(material))
