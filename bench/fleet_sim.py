"""Fleet scale by simulation: a request trace replayed through the project's own router and cache tiers.

Discrete-event: requests arrive at the trace's timestamps (divided by `speedup`) and are routed by
the gateway's `Router` (cache_aware, round_robin, least_loaded) over N decode replicas, each a real
`BlockManager` (the local prefix cache, `replica_blocks` slots of one trace block each), with S real
`StorePool` shards (tier 2; a block's shard is `kvcluster.kv.index.pick_store`, rendezvous hashing as
the workers place it). cache_aware's overlaps come from a `PrefixIndex` fed by the replicas' own
KV events (their BlockManager listener), the in-process answer to `RedisIndex.held_prefix`. Only
time is modelled (`CostModel`): a replica prefills one request at a time (the prefix it holds
costs nothing, store blocks cost a pull, the rest is computed in one forward), and otherwise runs continuous-
batching decode steps; an arriving request waits for the step in progress. TTFT = end of its
prefill - arrival.

Processor sharing (`FleetConfig.replicas_per_host`, `host_cores`): replicas on one host share its
cores. While n of them run a phase (a prefill or decode steps), each goes at min(1, host_cores /
(n x `CostModel.threads`)) of the cost model's speed (measured with one replica alone on the
machine), and a phase in progress is re-timed whenever n changes. The default, one replica per host
and no core count, is a GPU fleet: each replica runs at the cost model's speed whatever the others
do. bench/fleet_check.py runs 2 replicas of 2 torch threads on one 2-core host.

Tiers of a request's prompt blocks, in lookup order: local (the chosen replica's pool, `match`),
store (the next blocks whose shard holds them: `pin` + `release`, which touches the store's LRU),
computed. A request's TTFT adds the cost model's `request_path_s` (the gateway and gRPC path,
measured on this machine for the CPU model, 0 for the derived H100 one). New blocks are registered
locally (as many as the pool can spare while its running requests hold theirs) and pushed to their
shard. Context (`CostModel.context_s_per_token`, `attend_s_per_token_pair`, both 0 by default): a
prefill of N tokens after C cached ones (its local and store blocks) costs C x the first (reading the
cached K/V once) + N x C x the second (each new token attending to each cached one) more; a decode
step the same for each sequence of its batch (N = 1, C = its tokens so far, as the step begins). Not
modelled: the prefill service's own pool, waiting for an in-flight prefix, store spill tiers (the
store has none), network contention, attention among a prompt's own new tokens growing with their
number (the cost per prefill token is the one measured at 1,024).
"""

import heapq
import json
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cache_store.pool import StorePool
from gateway.replicas import Replica
from gateway.router import Router
from kvcluster.kv.block_manager import BlockManager
from kvcluster.kv.index import StoreRef, pick_store
from kvcluster.kv.pool import KVLayout
from kvcluster.kv.prefix_index import PrefixIndex
from kvcluster.proto import common_pb2

TRACES_DIR = Path(os.environ.get("KVC_TRACES_DIR", "/work/shared/traces"))  # Mooncake FAST25-release traces
TRACE_BLOCK_TOKENS = 512
POLICIES = ("cache_aware", "round_robin", "least_loaded")
FINGERPRINT = bytes(16)
TINY_LAYOUT = KVLayout(1, 1, 1, 1, "float32")  # the store pools' tensor: 8 bytes a block, the bookkeeping is real
PAYLOAD = bytes(TINY_LAYOUT.block_nbytes)
HEADER = common_pb2.BlockRef()


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: tuple[bytes, ...]   # the trace's hash ids as 16-byte keys, one per 512-token block


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    requests = []
    with open(path) as lines:
        for line in lines:
            row = json.loads(line)
            requests.append(TraceRequest(row["timestamp"] / 1000, row["input_length"], row["output_length"],
                                         tuple(h.to_bytes(16, "little") for h in row["hash_ids"])))
            if limit is not None and len(requests) == limit:
                break
    return requests


def ceiling_hit_ratio(requests: Sequence[TraceRequest]) -> float:
    """Share of prompt blocks an earlier request produced, counted while every block before hit (an
    infinite cache seen by every request): what no router and cache can beat."""
    seen, hits, total = set(), 0, 0
    for request in requests:
        total += len(request.block_hashes)
        for block_hash in request.block_hashes:
            if block_hash not in seen:
                break
            hits += 1
        seen.update(request.block_hashes)
    return hits / total if total else 0.0


def ttft_floor(requests: Sequence[TraceRequest], cost: "CostModel", block_tokens: int = TRACE_BLOCK_TOKENS) -> dict:
    """TTFT percentiles with the ceiling's hits all local (no pull), no queueing and no decode step in
    the way: only the prefill of the blocks no earlier request produced. No router can beat it."""
    seen, ttft = set(), []
    for request in requests:
        hits = 0
        for block_hash in request.block_hashes:
            if block_hash not in seen:
                break
            hits += 1
        seen.update(request.block_hashes)
        cached = block_tokens * hits
        ttft.append(cost.prefill(request.input_tokens - cached, cached) + cost.request_path_s)
    ttft.sort()
    return {f"p{q}": round(percentile_sorted(ttft, q), 4) for q in (50, 90, 99)}


@dataclass(frozen=True)
class CostModel:
    """Seconds per prefill token, per decode step by batch size (linear between the points given),
    per 512-token block pulled from the store, and of the request path outside the replica's model
    (`request_path_s`: client -> gateway -> routing -> gRPC -> scheduling and the first token's way
    back; a latency added to each TTFT, not replica time), and the context's terms: per cached token
    a forward reads (`context_s_per_token`) and per pair of a new token and a cached one it attends to
    (`attend_s_per_token_pair`), 0 unless calibrated (bench/fleet_check.py fits both on this machine)."""

    name: str
    source: str
    prefill_s_per_token: float
    decode_step_s: dict[int, float]
    pull_s_per_block: float
    max_batch: int
    request_path_s: float = 0.0
    threads: int = 1  # cores one replica's forward keeps busy (torch's intra-op threads on a CPU)
    context_s_per_token: float = 0.0       # per cached token a forward reads (once, whatever its new tokens)
    attend_s_per_token_pair: float = 0.0   # per (new token x cached token) of attention

    def prefill(self, tokens: int, context: int = 0) -> float:
        """A forward over `tokens` new tokens after `context` cached ones: one decode step (every weight
        is read, even for the one token of a fully cached prompt) plus the per-token cost plus the
        context's. Without the context terms, on the Xeon it gives 744 / 385 / 115 ms for 512 / 256 /
        64 new tokens where bench/results/ttft.json measured 764 / 384 / 111."""
        tokens = max(tokens, 0)
        return self.decode_step(1) + tokens * self.prefill_s_per_token + self.context_s(tokens, context)

    def context_s(self, tokens: int, context: int) -> float:
        """What `tokens` new tokens after `context` cached ones add for the context."""
        return context * (self.context_s_per_token + tokens * self.attend_s_per_token_pair)

    def decode_step(self, batch: int, contexts: Sequence[int] = ()) -> float:
        """One step of `batch` sequences, by the measured points; `contexts`: each one's tokens so far."""
        return self._decode_step(batch) + sum(self.context_s(1, context) for context in contexts)

    def _decode_step(self, batch: int) -> float:
        points = sorted(self.decode_step_s.items())
        for (b0, t0), (b1, t1) in zip(points, points[1:]):
            if batch <= b1:
                return t0 + (t1 - t0) * (max(batch, b0) - b0) / (b1 - b0)
        b1, t1 = points[-1]
        return t1 * batch / b1


@dataclass
class Job:
    index: int
    request: TraceRequest
    replica: int
    slots: list[int] = field(default_factory=list)  # pool slots it references until it ends
    remaining: int = 0           # tokens left to decode
    cached_blocks: int = 0       # leading prompt blocks found local or in the store
    queued_tokens: int = 0       # what the gateway added to its replica's queued_prefill_tokens


@dataclass
class SimReplica:
    """One decode replica: the gateway's view of it (`view`, whose open_calls is the load the router
    weighs), its pool's bookkeeping (`blocks`), its prefill queue and decode batch."""

    position: int
    view: Replica
    blocks: BlockManager
    prefill_queue: deque = field(default_factory=deque)
    decoding: list = field(default_factory=list)
    phase: str = "idle"          # idle, prefill, decode
    phase_start: float = 0.0
    step_s: float = 0.0
    steps: int = 0
    current: Job | None = None
    version: int = 0
    busy_s: float = 0.0
    host: int = 0                # replicas with the same host share its cores (FleetConfig.host_cores)
    work_s: float = 0.0          # the phase's length at full speed (the cost model's, measured alone)
    done_s: float = 0.0          # how much of it was done by `updated`
    updated: float = 0.0
    rate: float = 1.0            # full-speed seconds done per second now
    shared: bool = False         # the phase ran below full speed at some point


class CountingSink:
    """A pool's IndexSink: counts the index writes the real publisher would send, and feeds the
    in-process PrefixIndex (None: a store, whose entries the router does not read)."""

    def __init__(self, counters: dict, member_sink=None):
        self.counters = counters
        self.member_sink = member_sink

    def blocks_added(self, block_hashes: list[bytes]) -> None:
        self.counters["event_batches"] += 1
        self.counters["entries_written"] += len(block_hashes)
        if self.member_sink is not None:
            self.member_sink.blocks_added(block_hashes)

    def blocks_removed(self, block_hashes: list[bytes]) -> None:
        self.counters["event_batches"] += 1
        self.counters["entries_written"] += len(block_hashes)
        if self.member_sink is not None:
            self.member_sink.blocks_removed(block_hashes)


@dataclass(frozen=True)
class FleetConfig:
    policy: str
    replicas: int
    replica_blocks: int
    store_shards: int
    store_blocks_per_shard: int
    cost: CostModel
    speedup: float = 1.0
    overlap_weight: float = 1.0  # the gateway's default: a held prompt token weighs as a queued prefill token
    block_tokens: int = TRACE_BLOCK_TOKENS  # tokens per block (a scaled-down replay uses the cluster's 16)
    # Processor sharing: replicas `replicas_per_host` at a time (positions 0..k-1, k..2k-1, ...) share a
    # host of `host_cores` cores; while n of them run a phase, each runs at min(1, host_cores / (n x
    # cost.threads)) of the cost model's speed. host_cores 0: each replica has its own (a GPU each).
    replicas_per_host: int = 1
    host_cores: float = 0.0

    def speed(self, busy: int) -> float:
        """The speed of each of `busy` replicas running at once on one host, as a share of the cost
        model's (measured with the replica alone on its host)."""
        if self.host_cores <= 0 or busy <= 0:
            return 1.0
        return min(1.0, self.host_cores / (busy * max(self.cost.threads, 1)))


class FleetSim:
    """One run: `run(requests)` returns the figures of `summary`."""

    def __init__(self, config: FleetConfig):
        self.config = config
        self.router = Router(config.policy, config.overlap_weight)
        self.index = PrefixIndex()
        self.counters = {"event_batches": 0, "entries_written": 0, "held_prefix_calls": 0, "store_lookups": 0}
        self.replicas = []
        for i in range(config.replicas):
            layout = KVLayout(1, config.block_tokens, 1, 1, "float32").canonical()
            member = StoreRef(f"decode-{i}", f"sim:{i}", 1, layout)
            blocks = BlockManager(config.replica_blocks)
            blocks.listener = CountingSink(self.counters, self.index.sink(member.store_id))
            registered = {"block_size": str(config.block_tokens)}  # as a worker registers it: the router reads it
            self.replicas.append(SimReplica(i, Replica(member, None, None, published=registered), blocks,
                                            host=i // max(config.replicas_per_host, 1)))
        self._position = {id(r.view): r.position for r in self.replicas}
        self.shard_refs = [StoreRef(f"store-{s}", f"sim:s{s}", 1) for s in range(config.store_shards)]
        self.shards = {ref.store_id: StorePool(TINY_LAYOUT, config.store_blocks_per_shard,
                                               index=CountingSink(self.counters)) for ref in self.shard_refs}
        self.events: list = []
        self._seq = 0
        self.tiers = {"local": 0, "store": 0, "computed": 0}
        self.ttft_s: list[float] = []
        self.per_request: dict[int, dict] = {}  # request index -> its TTFT and tiers (for error analyses)

    # ---- the event loop --------------------------------------------------------------------

    def run(self, requests: Sequence[TraceRequest]) -> dict:
        for i, request in enumerate(requests):
            self._push(request.arrival_s / self.config.speedup, "arrive", i)
        self.requests = requests
        now = 0.0
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self._arrive(now, payload)
            else:
                replica_index, version = payload
                replica = self.replicas[replica_index]
                if version == replica.version:
                    self._phase_done(now, replica)
        return self.summary(requests, now)

    def _push(self, at: float, kind: str, payload) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, payload))

    def _arrive(self, now: float, index: int) -> None:
        request = self.requests[index]
        views = [r.view for r in self.replicas]
        overlaps = [0] * len(views)
        if self.config.policy == "cache_aware":
            overlaps = self.index.held_prefix(request.block_hashes, [v.member for v in views])
            self.counters["held_prefix_calls"] += 1
        route = self.router.pick(views, overlaps, request.input_tokens)
        route.replica.open_calls += 1
        job = Job(index, request, self._position[id(route.replica)], queued_tokens=route.queued_tokens)
        route.replica.queued_prefill_tokens += job.queued_tokens
        replica = self.replicas[job.replica]
        replica.prefill_queue.append(job)
        if replica.phase == "idle":
            self._start_next(now, replica)
        elif replica.phase == "decode":  # the prefill goes in after the decode step in progress
            done = min(replica.steps, math.ceil(self._progress(now, replica) / replica.step_s - 1e-9))
            replica.steps = done
            replica.work_s = done * replica.step_s
            self._schedule(now, replica)

    def _start_next(self, now: float, replica: SimReplica) -> None:
        replica.version += 1
        replica.phase_start = replica.updated = now
        replica.done_s, replica.shared = 0.0, False
        was_busy = replica.phase != "idle"
        if replica.prefill_queue:
            job = replica.current = replica.prefill_queue.popleft()
            replica.phase, replica.work_s = "prefill", self._prefill(job, replica)
        elif replica.decoding:
            batch = replica.decoding[:self.config.cost.max_batch]
            contexts = [job.request.input_tokens + job.request.output_tokens - job.remaining for job in batch]
            replica.step_s = self.config.cost.decode_step(len(batch), contexts)
            replica.steps = min(job.remaining for job in batch)
            replica.phase, replica.work_s = "decode", replica.steps * replica.step_s
        else:
            replica.phase = "idle"
        if self.config.host_cores > 0 and was_busy != (replica.phase != "idle"):
            self._share(now, replica.host)  # the others on its host slow down or speed up
        if replica.phase != "idle":
            replica.rate = self._speed(replica.host)
            replica.shared = replica.rate < 1.0
            self._schedule(now, replica)

    # ---- processor sharing (FleetConfig.host_cores) ------------------------------------------

    def _speed(self, host: int) -> float:
        return self.config.speed(sum(1 for r in self.replicas if r.host == host and r.phase != "idle"))

    def _progress(self, now: float, replica: SimReplica) -> float:
        """Full-speed seconds of its phase done by `now`."""
        if not replica.shared:
            return now - replica.phase_start
        return replica.done_s + (now - replica.updated) * replica.rate

    def _schedule(self, now: float, replica: SimReplica) -> None:
        """(Re)place the end of the replica's phase: at its full-speed length after its start while it
        has always run at full speed, else what is left at its present speed."""
        replica.version += 1
        if replica.shared:
            replica.done_s, replica.updated = self._progress(now, replica), now
            end = now + max(replica.work_s - replica.done_s, 0.0) / replica.rate
        else:
            end = replica.phase_start + replica.work_s
        self._push(end, "wake", (replica.position, replica.version))

    def _share(self, now: float, host: int) -> None:
        """The number of busy replicas on `host` changed: each busy one there goes on at the new speed."""
        speed = self._speed(host)
        for other in self.replicas:
            if other.host != host or other.phase == "idle" or speed == other.rate:
                continue
            other.done_s, other.updated = self._progress(now, other), now
            other.rate, other.shared = speed, True
            self._schedule(now, other)

    def _phase_done(self, now: float, replica: SimReplica) -> None:
        replica.busy_s += now - replica.phase_start
        if replica.phase == "prefill":
            job = replica.current
            self.ttft_s.append(now - job.request.arrival_s / self.config.speedup + self.config.cost.request_path_s)
            self.per_request[job.index]["ttft_s"] = self.ttft_s[-1]
            replica.view.queued_prefill_tokens -= job.queued_tokens
            self._cache_new_blocks(job, replica)
            job.remaining = job.request.output_tokens - 1
            if job.remaining > 0:
                replica.decoding.append(job)
            else:
                self._finish(job, replica)
        elif replica.phase == "decode":
            batch = replica.decoding[:self.config.cost.max_batch]
            for job in batch:
                job.remaining -= replica.steps
            replica.decoding = [job for job in replica.decoding if job.remaining > 0]
            for job in batch:
                if job.remaining <= 0:
                    self._finish(job, replica)
        self._start_next(now, replica)

    def _finish(self, job: Job, replica: SimReplica) -> None:
        replica.blocks.free(job.slots)
        replica.view.open_calls -= 1

    # ---- the tiers -------------------------------------------------------------------------

    def _prefill(self, job: Job, replica: SimReplica) -> float:
        """Look the prompt up local -> store -> compute (the real pools' verbs); its prefill seconds."""
        hashes = job.request.block_hashes
        job.slots = replica.blocks.match(hashes)
        local = len(job.slots)
        store = 0
        if local < len(hashes):
            self.counters["store_lookups"] += 1
            for block_hash in hashes[local:]:
                shard = self.shards[pick_store(block_hash, self.shard_refs).store_id]
                pinned, _ = shard.pin(FINGERPRINT, [block_hash], job.index)
                shard.release(job.index)
                if not pinned:
                    break
                store += 1
        computed = len(hashes) - local - store
        computed_tokens = job.request.input_tokens - self.config.block_tokens * (local + store)
        self.tiers["local"] += local
        self.tiers["store"] += store
        self.tiers["computed"] += computed
        job.cached_blocks = local + store
        busy_beside = sum(1 for r in self.replicas if r.host == replica.host and r is not replica and r.phase != "idle")
        self.per_request[job.index] = {"replica": replica.position, "local_blocks": local, "store_blocks": store,
                                       "computed_tokens": computed_tokens, "busy_on_host_at_start": busy_beside}
        cost = self.config.cost
        cached_tokens = self.config.block_tokens * job.cached_blocks
        return cost.prefill(computed_tokens, cached_tokens) + store * cost.pull_s_per_block

    def _cache_new_blocks(self, job: Job, replica: SimReplica) -> None:
        """Register the prompt's blocks past the local hit in the replica's pool (as many as it can spare
        now; they stay referenced until the request ends) and push the computed ones to their shard."""
        hashes = job.request.block_hashes
        for block_hash in hashes[job.cached_blocks:]:
            shard = self.shards[pick_store(block_hash, self.shard_refs).store_id]
            shard.store(block_hash, FINGERPRINT, HEADER, PAYLOAD, lease_s=0.0)
        missing = hashes[len(job.slots):]
        slots = replica.blocks.allocate(min(len(missing), replica.blocks.num_free)) or []
        for block_hash, slot in zip(missing, slots):
            replica.blocks.register(block_hash, slot)
        job.slots += slots

    # ---- figures ---------------------------------------------------------------------------

    def summary(self, requests: Sequence[TraceRequest], end_s: float) -> dict:
        total = sum(self.tiers.values())
        ceiling = ceiling_hit_ratio(requests)
        hit = (self.tiers["local"] + self.tiers["store"]) / total if total else 0.0
        span = max((requests[-1].arrival_s - requests[0].arrival_s) / self.config.speedup, 1e-9)
        busy = [r.busy_s for r in self.replicas]
        ttft = sorted(self.ttft_s)
        index_round_trips = (self.counters["held_prefix_calls"] + self.counters["store_lookups"]
                             + self.counters["event_batches"])
        return {
            "requests": len(requests), "blocks": total,
            "tier_blocks": dict(self.tiers),
            "tier_share": {k: round(v / total, 4) for k, v in self.tiers.items()},
            "hit_ratio": round(hit, 4), "ceiling": round(ceiling, 4),
            "hit_over_ceiling": round(hit / ceiling, 4) if ceiling else 0.0,
            "ttft_s": {f"p{q}": round(percentile_sorted(ttft, q), 4) for q in (50, 90, 99)},
            "load_imbalance": round(max(busy) / (sum(busy) / len(busy)), 3) if sum(busy) else 0.0,
            "utilization_mean": round(sum(busy) / len(busy) / end_s, 3) if end_s else 0.0,
            "index": {**self.counters, "round_trips": index_round_trips,
                      "round_trips_per_request": round(index_round_trips / len(requests), 2),
                      "round_trips_per_s": round(index_round_trips / span, 1),
                      "entries_written_per_s": round(self.counters["entries_written"] / span, 1)},
            "router_decisions_per_s": round(len(requests) / span, 2),
            "makespan_s": round(end_s, 1),
        }


def percentile_sorted(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def simulate(requests: Sequence[TraceRequest], config: FleetConfig) -> dict:
    return FleetSim(config).run(requests)
