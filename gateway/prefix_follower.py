"""The gateway's own copy of which decode replica holds which block, kept by following the KV events.

`RedisIndex.held_prefix` costs one Lua round trip per request whose work grows with replicas x
leading blocks (21-33 ms at 256 replicas sharing a 64-block prefix, bench/router_scale.py). With
`--routing-index local` the gateway instead keeps a `PrefixIndex` (0.2-0.4 ms for the same decision):
each refresh it mirrors the live members' epochs (a member new or in a new epoch is read from its
entries set, one that left is dropped), then applies the `{ns}:events` stream the workers' index
writes append to. Replaying events from before a snapshot ends in the right state (each hash's
last event wins), so a snapshot needs no lock against the writers. A follower that fell further
behind than the stream keeps starts over. Routing then sees changes up to one refresh late (the
index itself trails the pools by the publisher's queue).
"""

import threading
from collections.abc import Sequence

from kvcluster.kv.index import RedisIndex, StoreRef
from kvcluster.kv.prefix_index import PrefixIndex, count_by_member

READ_COUNT = 2000


def _id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


class PrefixFollower:
    """`sync(members)` on the refresh thread, `held_prefix` on request threads."""

    def __init__(self, index: RedisIndex):
        self.index = index
        self.prefix_index = PrefixIndex()
        self._epochs: dict[str, int] = {}
        self._last_id: str | None = None  # None: not started, or behind the stream's tail
        self._lock = threading.Lock()
        self.events_applied = 0
        self.restarts = 0

    def sync(self, members: Sequence[StoreRef]) -> None:
        """Blocking: mirror `members` (the live listing) and apply the events since the last sync.
        Raises kvcluster.errors.Unavailable when Redis is unreachable (the copy then stays as it was)."""
        oldest, newest = self.index.events_position()
        if self._last_id is not None and oldest != "0-0" and _id_key(oldest) > _id_key(self._last_id):
            self._last_id = None  # events we never read were trimmed away
        if self._last_id is None:
            with self._lock:
                self.prefix_index = PrefixIndex()
                self._epochs.clear()
            self._last_id = newest
            self.restarts += 1
        live = {m.store_id: m.epoch for m in members}
        for member_id, epoch in live.items():
            if self._epochs.get(member_id) != epoch:
                snapshot = self.index.member_entries(member_id, epoch)
                with self._lock:
                    self.prefix_index.drop_member(member_id)
                    self.prefix_index.sink(member_id).blocks_added(snapshot)
                    self._epochs[member_id] = epoch
        for member_id in set(self._epochs) - set(live):
            with self._lock:
                self.prefix_index.drop_member(member_id)
                del self._epochs[member_id]
        while events := self.index.read_events(self._last_id, READ_COUNT):
            with self._lock:
                for event_id, member_id, epoch, op, hashes in events:
                    if self._epochs.get(member_id) == epoch:
                        sink = self.prefix_index.sink(member_id)
                        (sink.blocks_added if op == "add" else sink.blocks_removed)(hashes)
                    self._last_id = event_id
            self.events_applied += len(events)

    def blocks_by_member(self) -> dict[str, int]:
        """Blocks the copy credits to each mirrored member (kvcluster_gateway_local_index_blocks):
        the lock routing waits on is held for a copy of the masks, the counting runs after."""
        with self._lock:
            (bit_of, masks), mirrored = self.prefix_index.masks(), list(self._epochs)
        counts = count_by_member(bit_of, masks)
        return {member: counts.get(member, 0) for member in mirrored}

    def held_prefix(self, block_hashes: Sequence[bytes], members: Sequence[StoreRef]) -> list[int]:
        """RedisIndex.held_prefix's answer from the copy (0 for a member in an epoch not mirrored yet)."""
        with self._lock:
            counts = self.prefix_index.held_prefix(block_hashes, members)
            return [n if self._epochs.get(m.store_id) == m.epoch else 0 for n, m in zip(counts, members)]
