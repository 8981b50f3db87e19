"""Block identity: chained xxh3-128 hashes of full token blocks under a model fingerprint.

hash_i = xxh3_128(fingerprint || hash_{i-1} || token ids of block i as little-endian uint32),
with hash_{-1} = the chain's root: 16 zero bytes, or a root derived from the request's
`cache_salt` when it has one. The fingerprint covers the model file, dtype, block size and KV
layout version, so incompatible workers can never share a block.

Two secrets keep block keys out of outsiders' reach:
- The cluster secret (the internal token) is mixed into the fingerprint through a key derived
  from it (`fingerprint_key`). Without the secret nobody can compute which key a popular
  prompt's blocks live under, so nobody can probe the stores or the index for it, nor plant a
  block under it. The fingerprint is the right place: every block hash already chains it in, it
  is never sent to Generate clients (it travels only on internal RPCs, which need the token), and
  workers of one cluster share the token, hence the fingerprint, while a worker with another
  token gets another fingerprint whose blocks never collide with ours. A cluster without a token
  keeps the unkeyed fingerprint. The key is HMAC-SHA256 of a fixed label under the secret, so the
  fingerprint reveals nothing about the token even to someone who sees it.
- A request's `cache_salt` (per tenant, as in vLLM) replaces the chain's root, so two tenants
  with different salts never share a block and cannot probe each other's prompts by timing.
"""

import hashlib
import hmac
from collections.abc import Sequence
from typing import NewType

import numpy as np
import xxhash

from kvcluster.errors import InvalidArgument

BlockHash = NewType("BlockHash", bytes)
Fingerprint = NewType("Fingerprint", bytes)

HASH_BYTES = 16
ROOT_HASH = BlockHash(bytes(HASH_BYTES))
MAX_CACHE_SALT_CHARS = 256
FINGERPRINT_KEY_LABEL = b"kvcluster/v1 fingerprint key"
CACHE_SALT_LABEL = b"kvcluster/v1 cache_salt|"


def hash_block(fingerprint: Fingerprint, parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The chained hash of one block given its parent's hash."""
    h = xxhash.xxh3_128()
    h.update(fingerprint)
    h.update(parent)
    h.update(np.asarray(token_ids, dtype="<u4").tobytes())
    return BlockHash(h.digest())


def chain_root(cache_salt: str = "") -> BlockHash:
    """The parent of a prompt's first block: ROOT_HASH, or one only requests with `cache_salt` reach."""
    if not cache_salt:
        return ROOT_HASH
    return BlockHash(xxhash.xxh3_128_digest(CACHE_SALT_LABEL + cache_salt.encode()))


def prefix_hashes(fingerprint: Fingerprint, token_ids: Sequence[int], block_size: int,
                  cache_salt: str = "") -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids` (a partial tail block gets none)."""
    return extend_hashes(fingerprint, chain_root(cache_salt), [], token_ids, block_size)


def extend_hashes(fingerprint: Fingerprint, root: BlockHash, hashes: list[BlockHash], token_ids: Sequence[int],
                  block_size: int, upto: int | None = None) -> list[BlockHash]:
    """Append to `hashes` (the chain of `token_ids`' first blocks, from `root`) the hashes of the next
    full blocks, up to `upto` blocks in all (default: every full block); returns `hashes`."""
    full = len(token_ids) // block_size
    upto = full if upto is None else min(upto, full)
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), upto):
        parent = hash_block(fingerprint, parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def check_cache_salt(cache_salt: str) -> str:
    """The salt, or InvalidArgument when it is longer than MAX_CACHE_SALT_CHARS."""
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidArgument("cache_salt", f"has {len(cache_salt)} characters; the limit is {MAX_CACHE_SALT_CHARS}")
    return cache_salt


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
