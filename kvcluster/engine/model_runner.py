"""The model runner: one step's scheduled sequences through one forward, one logits row each.

With batch-invariant numerics (the default) a step is one forward whatever it mixes: a decode is
a one-token chunk at its position, and every op computes a token the same whatever else is in
the batch, so mixing prefill chunks and decodes changes no bit (the scheduler relies on this).
The fast kernels pick their attention plan by the batch's shape, so there a mixed step runs its
decodes and its chunks as two forwards. A forward that raises is retried item by item and only
the items that still raise fail: one request's failure never fails its step.
"""

import logging
from collections.abc import Callable

import torch

from kvcluster.engine.scheduler import Scheduled
from kvcluster.kv.pool import KVPool
from kvcluster.model.llama import DecodeSeq, LlamaModel, PrefillSeq

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool):
        self.model = model
        self.pool = pool

    def run(self, items: list[Scheduled], on_failure: Callable[[Scheduled, Exception], None]
            ) -> tuple[list[Scheduled], torch.Tensor]:
        """(the items computed, their logits [n, vocab] in that order); each item whose forward
        failed even alone went to `on_failure`. K/V writes are idempotent (same tokens, same slots),
        so re-running an item is safe."""
        try:
            return items, self._forward(items)
        except Exception as exc:
            if len(items) == 1:
                log.exception("forward failed for request %s", items[0].seq.request_id)
                on_failure(items[0], exc)
                return [], torch.empty(0)
        kept, rows = [], []
        for item in items:
            alone, logits = self.run([item], on_failure)
            kept += alone
            rows += [logits] if alone else []
        return kept, torch.cat(rows) if rows else torch.empty(0)

    def _forward(self, items: list[Scheduled]) -> torch.Tensor:
        decodes = [item for item in items if item.decode]
        chunks = [item for item in items if not item.decode]
        if not chunks:
            return self.model.decode(self.pool.kv, [DecodeSeq(i.seq.token_ids[-1], i.seq.num_tokens - 1,
                                                              i.seq.block_table) for i in decodes])
        if decodes and not self.model.deterministic:  # decodes are items[:len(decodes)]
            return torch.cat([self._forward(decodes), self._forward(chunks)])
        return self.model.prefill(self.pool.kv, [PrefillSeq(i.seq.token_ids[i.seq.num_computed:i.seq.num_computed + i.num_tokens],
                                                            i.seq.num_computed, i.seq.block_table) for i in items])
