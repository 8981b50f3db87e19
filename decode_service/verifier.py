"""The live verifier: recompute a sampled fraction of warm requests without the cache and compare.

A request is "warm" when some of its prompt K/V did not come from this worker's own compute in
that request (this worker's local cache, the store, or the prefill service's hand-off). For a
sampled fraction (`--verify-fraction`), once the request has been served, the same prompt with
the same sampling parameters (seed included) runs again on the side through the same engine
with the cache bypassed, and the two outputs are compared token by token; then its recomputed
prompt blocks are compared byte for byte with the cached blocks that served it, to name the
block where they first differ. Under batch-invariant numerics (the default) both must be
identical: any difference is a bug (a corrupt block, a wrong hash, a hand-off error) and is
counted in `kvcluster_verify_mismatch_total` and logged. With the fast numerics (`--fast-numerics`,
or a device and dtype without batch-invariant kernels: kvcluster.worker.numerics) only the tokens are
compared (a correct block may differ in its last bits), and a token that differs may be a near-tie
rounded differently rather than a cache fault: the log says so. Verification runs one at a time in the
background and is skipped (counted) when one is already waiting: it never delays serving more
than the one side request it adds to the batch.
"""

import logging
import random
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from decode_service.metrics import DecodeMetrics
from kvcluster.engine.engine import Engine
from kvcluster.engine.sampling import SamplingParams
from kvcluster.engine.sequence import Sequence as EngineSeq
from kvcluster.errors import ResourceExhausted
from kvcluster.kv.blocks import BlockHash
from kvcluster.worker.engine_worker import EngineWorker

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    outputs_match: bool
    first_token_diff: int | None       # output position where the two outputs first differ
    diverging_block: int | None        # first prompt block whose recomputed bytes differ from the cached ones
    blocks_compared: int

    @property
    def ok(self) -> bool:
        return self.outputs_match and self.diverging_block is None


class Verifier:
    def __init__(self, worker: EngineWorker, metrics: DecodeMetrics, fraction: float, seed: int | None = None):
        self.worker = worker
        self.metrics = metrics
        self.fraction = fraction
        self._rng = random.Random(seed)
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="verify")
        self._busy = threading.Semaphore(2)  # one running, one waiting: more are skipped

    def close(self) -> None:
        self._runner.shutdown(wait=True)

    def maybe_verify(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                     served: Sequence[int], hashes: Sequence[BlockHash], warm: bool) -> None:
        """Called when a request has been served: sample it for verification."""
        if not warm or self.fraction <= 0 or self._rng.random() >= self.fraction:
            return
        if not self._busy.acquire(blocking=False):
            self.metrics.verify.labels("skipped").inc()
            return
        future = self._runner.submit(self.verify, request_id, list(prompt_ids), params, list(served), list(hashes))
        future.add_done_callback(lambda _: self._busy.release())

    def verify(self, request_id: str, prompt_ids: list[int], params: SamplingParams, served: list[int],
               hashes: list[BlockHash]) -> Verdict | None:
        holder: list[EngineSeq] = []

        def admit(engine: Engine) -> EngineSeq:
            seq = engine.add_request(prompt_ids, params, f"verify-{request_id}", keep_blocks=True, use_cache=False)
            holder.append(seq)
            return seq

        try:
            recomputed = [event.token_id for event in self.worker.stream(admit)]
        except ResourceExhausted:  # the worker is full: serving comes first
            self.metrics.verify.labels("skipped").inc()
            return None
        except Exception:
            log.exception("verify %s: the side recompute failed", request_id)
            self.metrics.verify.labels("skipped").inc()
            return None

        def compare(engine: Engine) -> tuple[int | None, int]:
            try:  # bytes are comparable only under batch-invariant numerics (fast kernels round by batch)
                return engine.first_diverging_block(holder[0], hashes) if engine.model.deterministic else (None, 0)
            finally:
                engine.release(holder[0])

        diverging, compared = self.worker.call(compare)
        first_diff = next((i for i, (a, b) in enumerate(zip(served, recomputed)) if a != b),
                          None if len(served) == len(recomputed) else min(len(served), len(recomputed)))
        verdict = Verdict(first_diff is None, first_diff, diverging, compared)
        if not verdict.ok:  # logged before it is counted: whoever sees the count finds the log line
            bs = self.worker.engine.config.block_size
            where = ("" if diverging is None else
                     f"; its prompt K/V first differs in block {diverging} (tokens {diverging * bs}-{(diverging + 1) * bs - 1})")
            if not self.worker.engine.model.deterministic:
                where += ("; blocks not compared: the fast numerics (--fast-numerics, or no batch-invariant kernels "
                          "for this device and dtype) round by batch, so a near-tie can flip a token without any "
                          "cache fault")
            log.error("verify mismatch: request %s (%d prompt tokens): %s%s", request_id, len(prompt_ids),
                      "outputs identical" if first_diff is None else
                      f"outputs diverge at output token {first_diff} (served {served[first_diff:first_diff + 4]}, "
                      f"recomputed {recomputed[first_diff:first_diff + 4]})", where)
            self.metrics.verify_mismatch.inc()
        self.metrics.verify.labels("match" if verdict.ok else "mismatch").inc()
        return verdict
