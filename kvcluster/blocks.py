"""Block identity: chained xxh3-128 hashes of full token blocks under a model fingerprint.

hash_i = xxh3_128(fingerprint || hash_{i-1} || token ids of block i as little-endian uint32),
with hash_{-1} = 16 zero bytes. The fingerprint covers the model file, dtype, block size and KV
layout version, so incompatible workers can never share a block.
"""

from collections.abc import Sequence
from typing import NewType

import numpy as np
import xxhash

BlockHash = NewType("BlockHash", bytes)
Fingerprint = NewType("Fingerprint", bytes)

HASH_BYTES = 16
ROOT_HASH = BlockHash(bytes(HASH_BYTES))


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


def make_fingerprint(model_digest: bytes, layout_canonical: str) -> Fingerprint:
    """Identity of (model file, dtype, block size, KV layout): blocks are shared only under an equal one."""
    return Fingerprint(xxhash.xxh3_128_digest(model_digest + b"|" + layout_canonical.encode()))
