"""Which prefill replica a decode worker calls.

The prefill replicas registered in Redis (kvcluster.worker.registration, namespace `{ns}:prefill`)
whose block fingerprint equals this worker's, least loaded first: load = this worker's open Prefill
calls to it + its published running and waiting sequences; ties go round robin. Prefill is one
short call and prefix reuse happens in the shared store, not in a prefill worker's own pool,
so load alone decides (no prefix scoring as the gateway does for decode). Without a live registered
replica it falls back to `--prefill-target`; without that either, the call fails as UNAVAILABLE
and decode prefills locally (its usual fallback).
"""

import itertools
import logging
import threading
from collections import Counter
from dataclasses import dataclass

import grpc

from kvcluster.errors import Unavailable
from kvcluster.kv.index import LOAD_FIELDS, RedisIndex, StoreRef, worker_namespace
from kvcluster.kv.membership import Membership, published_load
from kvcluster.proto import prefill_pb2_grpc
from kvcluster.rpc import plumbing as rpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaState:
    address: str
    host_id: str        # "" = unknown (kvcluster.worker.registration.host_id)
    queued_tokens: int  # prompt tokens it has yet to compute


class NoPrefillReplica(grpc.RpcError):
    """No prefill replica to call; an RpcError so the caller's fallback handles it like any failed call."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "no prefill replica registered or configured"


class PrefillPool:
    """Duck-types a PrefillServiceStub (`Prefill` and `PrefillStream(request, timeout=)`), choosing
    the replica per call."""

    def __init__(self, config, fingerprint: bytes, refresh_s: float = 1.0):
        self.config = config
        self.fingerprint = fingerprint.hex()
        self.static_target = config.prefill_target
        self.index = (RedisIndex(config.redis_url, worker_namespace(config.index_namespace, "prefill"))
                      if config.redis_url and config.registry_heartbeat_seconds > 0 else None)
        self.refresh_s = refresh_s
        self.membership = (Membership(self.index, self._ours, LOAD_FIELDS) if self.index is not None
                           else None)  # registered replicas and their published load fields, re-read every refresh_s
        self._stubs: dict[str, prefill_pb2_grpc.PrefillServiceStub] = {}
        self._channels: list[grpc.Channel] = []
        self._open: Counter[str] = Counter()
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._refresh_forever, name="prefill-pool", daemon=True)
        if self.index is not None:
            self.refresh()
            self._thread.start()

    def refresh(self) -> None:
        try:
            self.membership.refresh()
        except Unavailable:
            pass  # keep the last list; the next round retries

    @property
    def live(self) -> list[tuple[StoreRef, dict[str, str]]]:
        """Registered replicas of this fingerprint with their published load fields, as last read."""
        return [] if self.membership is None else self.membership.listing

    def candidates(self) -> list[ReplicaState]:
        """What decode's prefill policy weighs: each live replica's host and queued prompt tokens as
        last published; the static target (no registry) with neither known."""
        if self.live:
            return [ReplicaState(m.address, f.get("host_id", ""), int(f.get("queued_tokens", 0))) for m, f in self.live]
        return [ReplicaState(self.static_target, "", 0)] if self.static_target else []

    def pick(self) -> str:
        """The address to call now."""
        live = self.live
        if live:
            turn = next(self._turn)
            with self._lock:
                best = min(range(len(live)), key=lambda i: (self._open[live[i][0].address] + published_load(live[i][1]),
                                                            (i - turn) % len(live)))
            return live[best][0].address
        if self.static_target:
            return self.static_target
        raise NoPrefillReplica()

    def Prefill(self, request, timeout: float | None = None):
        address = self.pick()
        with self._lock:
            self._open[address] += 1
        try:
            return self._stub(address).Prefill(request, timeout=timeout)
        finally:
            with self._lock:
                self._open[address] -= 1

    def PrefillStream(self, request, timeout: float | None = None):
        """The streamed call on the replica chosen now; it counts as open until the stream ends."""
        address = self.pick()
        with self._lock:
            self._open[address] += 1
        try:
            call = self._stub(address).PrefillStream(request, timeout=timeout)
        except BaseException:
            self._closed(address)
            raise
        call.add_callback(lambda: self._closed(address))
        return call

    def _closed(self, address: str) -> None:
        with self._lock:
            self._open[address] -= 1

    def close(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        for channel in self._channels:
            channel.close()
        if self.index is not None:
            self.index.close()

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillServiceStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = rpc.make_channel(address, credentials=self.config.channel_credentials(),
                                           metadata=self.config.outgoing_metadata())
                self._channels.append(channel)
                stub = self._stubs[address] = prefill_pb2_grpc.PrefillServiceStub(channel)
            return stub

    def _ours(self, members: list[StoreRef]) -> list[StoreRef]:
        return [m for m in members if m.fingerprint == self.fingerprint]

    def _refresh_forever(self) -> None:
        while not self._stopped.wait(self.refresh_s):
            self.refresh()

