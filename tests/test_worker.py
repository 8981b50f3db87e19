"""EngineWorker: concurrent streams from many threads, cancellation, admission limits."""

import threading
import time

import pytest

from kvcluster.errors import ResourceExhausted
from kvcluster.model.sampling import SamplingParams
from kvcluster.worker import EngineWorker
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
