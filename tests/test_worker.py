"""EngineWorker: concurrent streams from many threads, cancellation, admission limits."""

import threading
import time

import pytest

from kvcluster.engine.sampling import SamplingParams
from kvcluster.errors import ResourceExhausted
from kvcluster.kv.block_io import batch_to_payloads
from kvcluster.worker.engine_worker import EngineWorker
from tests.conftest import make_tiny_engine
from tests.test_engine_tiny import prompt

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture
def worker(tokenizer):
    w = EngineWorker(make_tiny_engine(tokenizer), max_waiting=8).start()
    yield w
    w.stop()


def test_concurrent_streams_match_sequential(worker):
    prompts = [prompt(10 + 9 * i, seed=i) for i in range(6)]
    sequential = [[e.token_id for e in worker.stream(lambda eng, p=p: eng.add_request(p, GREEDY))] for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = [e.token_id for e in worker.stream(lambda eng: eng.add_request(prompts[i], GREEDY))]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(6)] == sequential
    assert worker.call(lambda eng: eng.blocks.num_used) == 0


def test_closing_a_stream_aborts_and_frees(worker):
    stream = worker.stream(lambda eng: eng.add_request(prompt(40), SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)))
    next(stream)
    assert worker.call(lambda eng: eng.blocks.num_used) > 0
    stream.close()
    assert worker.call(lambda eng: (eng.blocks.num_used, eng.has_work())) == (0, False)


def test_full_waiting_queue_is_resource_exhausted(tokenizer):
    w = EngineWorker(make_tiny_engine(tokenizer), max_waiting=0).start()
    try:
        with pytest.raises(ResourceExhausted, match="max_waiting"):
            next(w.stream(lambda eng: eng.add_request(prompt(5), GREEDY)))
    finally:
        w.stop()


def test_oversized_request_is_resource_exhausted(tokenizer):
    w = EngineWorker(make_tiny_engine(tokenizer, kv_blocks=8)).start()
    try:
        with pytest.raises(ResourceExhausted, match="KV blocks"):
            next(w.stream(lambda eng: eng.add_request(prompt(100), SamplingParams(max_tokens=100))))
        events = list(w.stream(lambda eng: eng.add_request(prompt(50), GREEDY)))
        assert len(events) == GREEDY.max_tokens  # the worker still serves what fits
    finally:
        w.stop()


class DescheduledHandler(EngineWorker):
    """A handler thread that loses the CPU right after admission (a loaded 2-core machine): the
    engine thread runs the whole sequence before the handler looks at it again."""

    def call(self, fn, timeout=None):
        result = super().call(fn, timeout)
        while self.engine.has_work():
            time.sleep(0.005)
        return result


def test_a_sequence_finished_before_its_handler_resumes_still_streams_every_token(tokenizer):
    engine = make_tiny_engine(tokenizer)
    p = prompt(30)
    want = [e.token_id for e in engine.generate(p, GREEDY, use_cache=False)]
    w = DescheduledHandler(engine).start()
    try:  # the first token handed over (as from a prefill worker), the rest computed here
        events = list(w.stream(lambda eng: eng.add_request(p, GREEDY, output_ids=want[:1], use_cache=False)))
    finally:
        w.stop()
    assert [e.token_id for e in events] == want
    assert events[-1].finish_reason is not None



def test_a_pinned_export_survives_release_and_eviction_until_unpinned(tokenizer):
    """On a host-memory pool an export pins its slots instead of gathering them on the engine thread:
    after the sequence is released they can be neither evicted nor handed out until the reader gives
    them back, and their bytes are those of the gathered snapshot."""
    engine = make_tiny_engine(tokenizer)
    seq = engine.add_request(prompt(40, seed=7), SamplingParams(max_tokens=1, temperature=0.0), keep_blocks=True)
    while engine.has_work():
        engine.step()
    export = engine.export_blocks(seq, 0)
    assert export.batch is None and len(export.slots) == 40 // engine.config.block_size
    snapshot = batch_to_payloads(engine.read_blocks(export.slots))
    engine.release(seq)
    assert all(engine.blocks.refs(slot) == 1 for slot in export.slots)  # the export's own reference
    taken = engine.blocks.allocate(engine.blocks.num_free)  # everything that can be handed out
    assert not set(taken) & set(export.slots)
    assert export.payloads() == snapshot and export.payloads(slice(1, 2)) == snapshot[1:2]
    engine.blocks.free(taken)
    engine.unpin(export)
    assert export.slots == [] and engine.blocks.num_used == 0
    engine.blocks.check()


def test_wait_idle_waits_while_a_request_runs(worker):
    """Background work (the decode worker's write-behind pushes) waits for the engine to have no
    request; a running one keeps it waiting, and it is let through once the request ends."""
    assert worker.wait_idle(5.0)
    length = worker.engine.model_config.context_length - 8
    stream = worker.stream(lambda eng: eng.add_request(prompt(4, seed=1), SamplingParams(max_tokens=length,
                                                                                         temperature=0.0,
                                                                                         ignore_eos=True)))
    next(stream)  # running now, for hundreds of steps
    assert not worker.wait_idle(0.05)
    stream.close()  # aborts it
    assert worker.wait_idle(5.0, settle=0.01)
