"""An in-process view of which member (decode replica, store) holds which block, fed by KV events.

The same question `RedisIndex.held_prefix` answers in one round trip, answered from memory: each
member's `sink` is an IndexSink (`blocks_added`, `blocks_removed`: the events a BlockManager or a
StorePool emits), and `held_prefix(block_hashes, members)` counts, per member, the leading blocks
it holds. A router fed by events instead of a Redis call per request (Dynamo's KV router keeps such
an index): the fleet simulator (bench/fleet_sim.py) routes with it, and bench/fleet_sim.py's router
scale check measures it at 256 replicas x 10k blocks each.

Holders of a block are one int, a bit per member (bit positions handed out at first sight), so a
prompt's walk is one AND per block whatever the fleet size; a member's count is the position at
which its bit drops out. Memory: one dict entry per distinct block plus an int of
ceil(members / 30) digits.
"""

from collections.abc import Sequence

from kvcluster.kv.index import StoreRef


class MemberSink:
    """The IndexSink of one member: what its pool adds and evicts, in order."""

    def __init__(self, index: "PrefixIndex", bit: int):
        self._index = index
        self._bit = bit

    def blocks_added(self, block_hashes: list[bytes]) -> None:
        self._index.add(self._bit, block_hashes)

    def blocks_removed(self, block_hashes: list[bytes]) -> None:
        self._index.remove(self._bit, block_hashes)


class PrefixIndex:
    """block hash -> bitmask of the members holding it. Not thread-safe: one owner thread."""

    def __init__(self):
        self._bit_of: dict[str, int] = {}
        self._holders: dict[bytes, int] = {}

    def sink(self, member_id: str) -> MemberSink:
        """The sink `member_id`'s pool reports to (a member keeps its bit for the index's life)."""
        return MemberSink(self, self._member_bit(member_id))

    def add(self, bit: int, block_hashes: Sequence[bytes]) -> None:
        mask = 1 << bit
        holders = self._holders
        for block_hash in block_hashes:
            holders[block_hash] = holders.get(block_hash, 0) | mask

    def remove(self, bit: int, block_hashes: Sequence[bytes]) -> None:
        keep = ~(1 << bit)
        holders = self._holders
        for block_hash in block_hashes:
            left = holders.get(block_hash, 0) & keep
            if left:
                holders[block_hash] = left
            else:
                holders.pop(block_hash, None)

    def drop_member(self, member_id: str) -> int:
        """Forget everything `member_id` holds (it left or reset its cache); the entries dropped."""
        bit = self._bit_of.get(member_id)
        if bit is None:
            return 0
        held = [h for h, mask in self._holders.items() if mask >> bit & 1]
        self.remove(bit, held)
        return len(held)

    @property
    def num_blocks(self) -> int:
        """Distinct blocks some member holds."""
        return len(self._holders)

    def masks(self) -> tuple[dict[str, int], list[int]]:
        """Copies of the member -> bit map and of every block's holder mask: what `blocks_by_member`
        counts, taken quickly so an owner holding a lock can count after letting it go."""
        return dict(self._bit_of), list(self._holders.values())

    def blocks_by_member(self) -> dict[str, int]:
        """Blocks each member holds."""
        return count_by_member(*self.masks())

    def held_prefix(self, block_hashes: Sequence[bytes], members: Sequence[StoreRef]) -> list[int]:
        """For each member, how many leading `block_hashes` it holds (RedisIndex.held_prefix's answer)."""
        bits = [self._bit_of.get(m.store_id) for m in members]
        wanted = 0
        for bit in bits:
            if bit is not None:
                wanted |= 1 << bit
        dropped_at: dict[int, int] = {}
        active, position = wanted, 0
        holders = self._holders
        for position, block_hash in enumerate(block_hashes):
            still = active & holders.get(block_hash, 0)
            if still != active:
                gone = active & ~still
                while gone:
                    low = gone & -gone
                    dropped_at[low.bit_length() - 1] = position
                    gone ^= low
                active = still
                if not active:
                    break
        else:
            position = len(block_hashes)
        return [0 if bit is None else dropped_at.get(bit, position if active >> bit & 1 else 0) for bit in bits]

    def _member_bit(self, member_id: str) -> int:
        bit = self._bit_of.get(member_id)
        if bit is None:
            bit = self._bit_of[member_id] = len(self._bit_of)
        return bit


def count_by_member(bit_of: dict[str, int], masks: Sequence[int]) -> dict[str, int]:
    """Blocks each member holds, from PrefixIndex.masks() (one walk over the (block, member) entries)."""
    counts: dict[int, int] = {}
    for mask in masks:
        while mask:
            low = mask & -mask
            bit = low.bit_length() - 1
            counts[bit] = counts.get(bit, 0) + 1
            mask ^= low
    return {member: counts.get(bit, 0) for member, bit in bit_of.items()}
