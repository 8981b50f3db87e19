"""Which KV slot holds what: reference counts, free slots, and the hash index of full blocks.

The bookkeeping half of a paged KV cache (vLLM's BlockManager / KVCacheManager); the tensor half
is `kvcluster.kv.pool.KVPool`. Slots are reference counted, and a full block can be registered
under its chained hash: that is the worker-local prefix cache (the first tier; the cache store is
the second). Sequences with a common prefix `match` the same physical slots; a slot whose last
reference goes keeps its block and its hash (evictable, least recently used first) until
`allocate` needs the room. Only the owner thread changes it; `peek` is a read-only hint for
other threads. The cache store uses it for its slots without the hash index.

A `listener` (an IndexSink: `blocks_added`, `blocks_removed`) hears of every hash registered and
every cached block evicted or reset, in order, on the owner's thread; it must only enqueue (a
decode worker publishes them to Redis from another thread so the gateway can route by what each
pool holds).
"""

from collections import OrderedDict, deque
from collections.abc import Sequence


class BlockManager:
    """Reference-counted slots [0, num_blocks) and a hash -> slot index. No allocation per request."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # no references, no block worth keeping
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # no references, a cached block; LRU first
        self._slot_of: dict[bytes, int] = {}   # block hash -> slot holding it
        self._hash_of: dict[int, bytes] = {}
        self.evictions = 0
        self.listener = None  # IndexSink told of registered and removed hashes; None = nobody

    @property
    def num_free(self) -> int:
        """Slots `allocate` can hand out: free ones plus cached blocks nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Slots referenced by someone."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (referenced or not)."""
        return len(self._slot_of)

    def allocate(self, count: int) -> list[int] | None:
        """`count` slots with one reference each, or None when they cannot be spared. Free slots go
        first; then the least recently used unreferenced cached blocks are evicted."""
        if count > self.num_free:
            return None
        slots, evicted = [], []
        for _ in range(count):
            if self._free:
                slot = self._free.popleft()
            else:
                slot, _ = self._evictable.popitem(last=False)
                evicted.append(self._hash_of.pop(slot))
                del self._slot_of[evicted[-1]]
                self.evictions += 1
            self._refs[slot] = 1
            slots.append(slot)
        if evicted and self.listener is not None:
            self.listener.blocks_removed(evicted)
        return slots

    def free(self, slots: Sequence[int]) -> None:
        """Drop one reference to each slot. A slot left without references becomes free, or
        evictable if it holds a registered block."""
        for slot in slots:
            refs = self._refs[slot] - 1
            if refs < 0:
                raise RuntimeError(f"KV slot {slot} released more often than it was taken")
            self._refs[slot] = refs
            if refs == 0:
                if slot in self._hash_of:
                    self._evictable[slot] = None
                else:
                    self._free.append(slot)

    def share(self, slots: Sequence[int]) -> None:
        """One more reference to each slot (already referenced or cached): it can be neither evicted
        nor handed out again until `free`d."""
        for slot in slots:
            if self._refs[slot] == 0:
                if slot not in self._evictable:
                    raise RuntimeError(f"KV slot {slot} is free: there is nothing to share")
                del self._evictable[slot]
            self._refs[slot] += 1

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """Slots of the longest prefix of `hashes` held here, each with one more reference."""
        slots = []
        for block_hash in hashes:
            slot = self._slot_of.get(block_hash)
            if slot is None:
                break
            if self._refs[slot] == 0:
                del self._evictable[slot]
            self._refs[slot] += 1
            slots.append(slot)
        return slots

    def peek(self, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` are held now: a hint for other threads (a block may be evicted
        before they act on it; `match` on the owner's thread is the authority)."""
        held = 0
        for block_hash in hashes:
            if block_hash not in self._slot_of:
                break
            held += 1
        return held

    def slot_of(self, block_hash: bytes) -> int | None:
        """The slot holding `block_hash` now, without taking a reference (owner's thread only)."""
        return self._slot_of.get(block_hash)

    def register(self, block_hash: bytes, slot: int) -> bool:
        """Make the full block in `slot` findable under `block_hash`. False (nothing changes) when the
        hash is already held elsewhere or the slot already holds another block."""
        if block_hash in self._slot_of or slot in self._hash_of:
            return False
        self._slot_of[block_hash] = slot
        self._hash_of[slot] = block_hash
        if self.listener is not None:
            self.listener.blocks_added([block_hash])
        return True

    def clear_cache(self) -> list[bytes]:
        """Forget every registered hash (the local cache's reset): unreferenced cached slots become
        free, referenced ones stay with their sequences but are no longer findable; the listener
        hears of every removal. The hashes removed."""
        removed = list(self._slot_of)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._slot_of.clear()
        self._hash_of.clear()
        if removed and self.listener is not None:
            self.listener.blocks_removed(removed)
        return removed

    def cached_hashes(self) -> list[bytes]:
        """Every hash findable now (owner's thread: a snapshot for a listener that starts late)."""
        return list(self._slot_of)

    def check(self) -> None:
        """Raise AssertionError unless every slot is exactly one of referenced, free, evictable, and
        the hash index is one-to-one (tests: no slot leaked)."""
        free, evictable = set(self._free), set(self._evictable)
        referenced = {s for s in range(self.num_blocks) if self._refs[s] > 0}
        assert len(free) == len(self._free), "a slot is free twice"
        assert not free & evictable and not referenced & (free | evictable), "a slot is in two states"
        assert free | evictable | referenced == set(range(self.num_blocks)), "a slot is in no state"
        assert {self._slot_of[h] for h in self._slot_of} == set(self._hash_of), "the hash index is not one-to-one"
        assert evictable <= set(self._hash_of), "an evictable slot holds no registered block"
