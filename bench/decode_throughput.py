"""Decode throughput vs batch size: our in-process engine against Hugging Face `transformers`.

Both run the same GGUF (transformers dequantizes it itself: `from_pretrained(dir, gguf_file=..)`),
in the same dtype (the suite's `--dtype`, fp32 by default), on CPU, greedy, a fixed output
length, on the same random prompts of different lengths (transformers batches them with left
padding). Prefill is excluded from both:
ours times decode steps of an already prefilled batch; transformers' generate(1 + steps tokens) is
stamped by a logits processor after every forward, and its decode time runs from the first stamp
(the end of the prefill) to the last.
Repetitions alternate ours / transformers. Targets: ours >= 1.5x transformers at batch 8 and
>= 1.2x at batch 1 and 16; ours at batch 8 >= 4x ours at batch 1. Tiny mode skips transformers
(it needs the `bench` extras).
"""

import contextlib
import io
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import at_least, not_run, progress
from bench.context import BenchContext, gpu_note
from bench.engine import random_prompt, running_batch
from bench.plots import line_plot
from kvcluster.engine.engine import Engine
from kvcluster.engine.sampling import SamplingParams

NAME = "decode_throughput"
OURS_OVER_HF_TARGETS = {1: 1.2, 8: 1.5, 16: 1.2}  # batch -> ours / transformers
BATCH8_OVER_BATCH1_TARGET = 4.0
CHECK_TEXT = "The capital of France is"
CHECK_TOKENS = 8


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]
    steps: int
    repeats: int
    transformers: bool


SIZES = {"full": Sizes((1, 2, 4, 8, 16), 16, 3, True),
         "quick": Sizes((1, 8), 8, 1, True),
         "tiny": Sizes((1, 8), 4, 1, False)}


def batch_prompts(batch: int) -> list[list[int]]:
    """Prompts of 64, 68, 72, ... tokens: different lengths, so padding and ragged batches both count."""
    return [random_prompt(64 + 4 * i, seed=1000 + i) for i in range(batch)]


class TransformersBaseline:
    """SmolLM2 (or --model) loaded by transformers from the same GGUF, offline."""

    def __init__(self, model_path: Path, dtype: torch.dtype = torch.float32):
        os.environ["HF_HUB_OFFLINE"] = "1"
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
        # transformers' GGUF de-quantizing progress bar ignores its own switch; keep it off our output
        with contextlib.redirect_stderr(io.StringIO()):
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                              dtype=dtype).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.version = transformers.__version__

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, list[float]]:
        """Greedy, exactly `new_tokens` per prompt (EOS cannot end it early). Returns the new ids and
        the time after each step's forward (the first one ends the prefill)."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # [batch, width], left-padded
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        stamps: list[float] = []

        def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return scores

        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                      logits_processor=self._processors([stamp]))
        return out[:, width:], stamps

    def decode_seconds(self, prompts: list[list[int]], steps: int) -> float:
        """Seconds of `steps` decode steps (forward + greedy pick), from the step stamps of one generate."""
        _, stamps = self.generate(prompts, 1 + steps)
        return stamps[-1] - stamps[0]

    @staticmethod
    def _processors(functions):
        from transformers import LogitsProcessorList

        return LogitsProcessorList(functions)


def same_model_check(engine: Engine, hf: TransformersBaseline) -> dict:
    """Both tokenize a text alike and continue it with the same greedy tokens (same weights)."""
    ours_ids = engine.tokenizer.encode(CHECK_TEXT)
    hf_ids = hf.tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    ours_out = [e.token_id for e in engine.generate(ours_ids, SamplingParams(max_tokens=CHECK_TOKENS, temperature=0.0,
                                                                             ignore_eos=True))]
    hf_out = hf.generate([ours_ids], CHECK_TOKENS)[0][0].tolist()
    return {"text": CHECK_TEXT, "tokenizer_ids_match": ours_ids == hf_ids, "greedy_tokens_match": ours_out == hf_out,
            "ours": ours_out, "transformers": hf_out}


def measure_batch(engine: Engine, hf: TransformersBaseline | None, batch: int, sizes: Sizes) -> dict:
    prompts = batch_prompts(batch)
    ours_s, hf_s = [], []
    with running_batch(engine, prompts) as time_steps:
        time_steps(sizes.steps)  # warm-up
        for _ in range(sizes.repeats):
            ours_s.append(time_steps(sizes.steps))
            if hf is not None:
                hf_s.append(hf.decode_seconds(prompts, sizes.steps))
    tokens = batch * sizes.steps
    row = {"ours_tok_s": round(tokens / statistics.median(ours_s), 2)}
    if hf_s:
        row["transformers_tok_s"] = round(tokens / max(statistics.median(hf_s), 1e-9), 2)
    return row


def run(ctx: BenchContext) -> dict:
    sizes = ctx.pick(SIZES)
    engine = ctx.engine()
    hf = None
    if sizes.transformers:
        progress(NAME, "loading the transformers baseline from the same GGUF")
        hf = TransformersBaseline(ctx.model_path, engine.model.dtype)
    version = hf.version if hf is not None else None
    try:
        check = same_model_check(engine, hf) if hf is not None else None
        rows = {}
        for batch in sizes.batches:
            rows[batch] = measure_batch(engine, hf, batch, sizes)
            progress(NAME, f"batch {batch:>2}: " + "  ".join(f"{k} {v:8.1f}" for k, v in rows[batch].items()))
    finally:
        del hf  # about 0.5 GB of fp32 weights the later measures do not need
    payload = {"steps": sizes.steps, "repeats": sizes.repeats,
               "prompt_tokens": {str(b): [len(p) for p in batch_prompts(b)] for b in sizes.batches},
               "tok_s": {str(b): row for b, row in rows.items()}, "same_model_check": check,
               "transformers": version, "dtype": engine.layout.dtype, "ratios": ratios(rows), "gpu": gpu_note()}
    ctx.write(NAME, payload)
    batches = list(rows)
    series = {"kvcluster engine": (batches, [rows[b]["ours_tok_s"] for b in batches])}
    if sizes.transformers:
        series["transformers generate"] = (batches, [rows[b]["transformers_tok_s"] for b in batches])
    line_plot(ctx.results_dir / f"{NAME}.png", f"Decode throughput, {engine.layout.dtype} CPU, {sizes.steps} steps (prefill excluded)",
              "batch size", "decoded tokens / s", series, log_x=True)
    return payload


def ratios(rows: dict[int, dict]) -> dict:
    result = {}
    for batch, target in OURS_OVER_HF_TARGETS.items():
        if batch not in rows:
            continue
        if "transformers_tok_s" in rows[batch]:
            result[f"ours_over_transformers_batch{batch}"] = at_least(
                rows[batch]["ours_tok_s"] / rows[batch]["transformers_tok_s"], target)
        else:
            result[f"ours_over_transformers_batch{batch}"] = not_run(
                f">= {target:g}", "tiny mode: the transformers baseline is skipped")
    result["ours_batch8_over_batch1"] = at_least(rows[8]["ours_tok_s"] / rows[1]["ours_tok_s"], BATCH8_OVER_BATCH1_TARGET)
    return result

