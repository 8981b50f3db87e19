"""The live members of one registry namespace as a reader last saw them: cache stores for the cache
client, prefill replicas for decode's prefill pool, decode replicas for the gateway. One cached view
over `RedisIndex.live_stores` and the fields each member published; each reader picks its filter,
its fields and how stale a view it reuses, and refreshes it on its own schedule (on read, from a
thread, from an event loop)."""

import math
import threading
import time
from collections.abc import Callable, Sequence

from kvcluster.kv.index import RedisIndex, StoreRef

Listing = list[tuple[StoreRef, dict[str, str]]]  # each member and the fields it published


class Membership:
    """The members `accept` keeps of those the registry lists live, each with the `fields` it published
    ({} when none are asked for). `refresh` re-reads (raising Unavailable, the last listing kept);
    `current` reuses the listing for up to `max_age_s`. Thread-safe."""

    def __init__(self, index: RedisIndex, accept: Callable[[list[StoreRef]], list[StoreRef]] = list,
                 fields: Sequence[str] = (), max_age_s: float = 0.0):
        self.index = index
        self.accept = accept
        self.fields = tuple(fields)
        self.max_age_s = max_age_s
        self._listing: Listing = []
        self._read_at = -math.inf  # monotonic; never read yet
        self._lock = threading.Lock()

    @property
    def listing(self) -> Listing:
        """As last read (nothing read: empty)."""
        return self._listing

    def refresh(self) -> Listing:
        members = self.accept(self.index.live_stores())
        published = (self.index.member_fields([m.store_id for m in members], self.fields) if self.fields
                     else [{} for _ in members])
        return self.keep(list(zip(members, published)))

    def current(self) -> Listing:
        """The listing, re-read first when older than `max_age_s`."""
        if time.monotonic() - self._read_at > self.max_age_s:
            return self.refresh()
        return self._listing

    def keep(self, listing: Listing) -> Listing:
        """Take `listing` as read now (a reader that read the registry itself, e.g. at start-up)."""
        with self._lock:
            self._listing, self._read_at = listing, time.monotonic()
        return listing


def published_load(fields: dict[str, str]) -> int:
    """Sequences running and waiting on a worker at its last heartbeat (its LOAD_FIELDS)."""
    return int(fields.get("running", 0)) + int(fields.get("waiting", 0))
