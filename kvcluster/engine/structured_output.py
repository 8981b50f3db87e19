"""Structured output (OpenAI's response_format) through llguidance, a maintained grammar engine.

`Grammars` belongs to one engine: it compiles each JSON Schema once into a template matcher (kept
LRU) and hands every sequence a copy. llguidance's view of the tokenizer is built once per process
(about 2 s for a 49k vocabulary, on first use, on the calling thread). JSON is compact (no free whitespace between
tokens), so a small model cannot wander into endless blank space. `check` runs on request handler
threads, so the engine thread normally only copies a compiled template.

Per step, `fill_bitmask` asks llguidance for every constrained row's allowed-token bitmask in one
call (its executor computes them in parallel), and logits_processors applies it as one tensor mask.
A sequence's matcher consumes each token as it is appended (Sequence.append_token), resumed and
handed-over tokens included, so a preempted or failed-over request continues in the same state.
"""

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence as Seq

import llguidance
import torch

from kvcluster.engine.sampling_params import StructuredOutput
from kvcluster.errors import InvalidArgument

MAX_COMPILED = 64               # template matchers kept per engine
JSON_OPTIONS = {"whitespace_flexible": False}
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
# llguidance's view of each Tokenizer, shared by the engines over it (building one takes seconds)
_ll_tokenizers: "weakref.WeakKeyDictionary[object, dict[int, llguidance.LLTokenizer]]" = weakref.WeakKeyDictionary()
_ll_tokenizers_lock = threading.Lock()


class Grammars:
    """Compiled grammars of one engine's tokenizer. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def check(self, spec: StructuredOutput | None) -> None:
        """Compile `spec` now (cached), or raise InvalidArgument with llguidance's reason."""
        if spec is not None:
            self._template(spec)

    def matcher(self, spec: StructuredOutput, handed: Seq[int] = ()) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence; InvalidArgument when tokens handed over as output (a
        resumed request's) do not follow the grammar. The caller's append_token consumes them."""
        template = self._template(spec)
        if handed:
            probe = template.deep_copy()
            accepted = probe.try_consume_tokens(list(handed))
            if accepted < len(handed):
                raise InvalidArgument("resume_token_ids", f"token {accepted} ({handed[accepted]}) does not follow "
                                      f"sampling.structured_output")
        return template.deep_copy()

    def _template(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        spec.validate()
        key = spec.json_schema
        with self._lock:
            template = self._templates.get(key)
            if template is not None:
                self._templates.move_to_end(key)
                return template
        template = self._compile(spec)
        with self._lock:
            self._templates[key] = template
            while len(self._templates) > MAX_COMPILED:
                self._templates.popitem(last=False)
        return template

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        field_name = f"sampling.structured_output.{spec.kind}"
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidArgument(field_name, f"not a usable JSON Schema: {exc}") from None
        matcher = llguidance.LLMatcher(ll_tokenizer(self._tokenizer, self.vocab_size), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(field_name, f"not a usable JSON Schema: {_first_line(matcher.get_error())}")
        return matcher


def ll_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` for logits of `vocab_size`, built once per process."""
    with _ll_tokenizers_lock:
        built = _ll_tokenizers.setdefault(tokenizer, {})
        if vocab_size not in built:
            # the engine's Tokenizer wraps a `tokenizers` object; llguidance reads its JSON form
            built[vocab_size] = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                       eos_token=tokenizer.eos_id)
        return built[vocab_size]


def fill_bitmask(rows: Seq[tuple[int, llguidance.LLMatcher]], batch: int, vocab_size: int) -> torch.Tensor:
    """[batch, ceil(vocab / 32)] int32: bit t of row r is set when row r may emit token t. Rows not in
    `rows` allow everything; each listed matcher fills its row, all in one parallel llguidance call."""
    words = (vocab_size + 31) // 32
    bitmask = torch.full((batch, words), -1, dtype=torch.int32)
    _shared_executor().unsafe_compute_mask_ptr([(matcher, row) for row, matcher in rows], bitmask.data_ptr(),
                                                 words * 4, batch)
    return bitmask


def _shared_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "rejected by the grammar compiler"

