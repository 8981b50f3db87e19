"""The cost of structured output: decode tok/s of 8 sequences held to a JSON Schema ÷ the same 8 free,
in-process, measured side by side: two engines over the same weights run their batch of 8 step by
step in turn (the same prompts), and the figure is the ratio of their median step times.

Constrained steps add llguidance's bitmask fill for every row (one parallel call), the mask as one
tensor op and each matcher's token accept. The schema (an object with an array of at least 64
strings) cannot close within the measured steps, so the batch stays 8 wide in both runs.
Target on the 2-core CPU: >= 0.8.
Run alone: `python -m bench.structured_output [--quick] [--model FILE]`; `python -m bench.suite`
runs it as the measure `structured_output`.
"""

import argparse
import json
import statistics
from dataclasses import replace

import torch

from bench.common import at_least, median_seconds, progress, write_result
from bench.context import BenchContext, gpu_note
from bench.engine import running_batch
from bench.plots import bar_plot
from kvcluster.engine.engine import Engine, EngineConfig, load_engine
from kvcluster.engine.logits_processors import pick
from kvcluster.engine.sampling_params import SamplingParams, StructuredOutput
from kvcluster.model.tokenizer import ChatMessage

NAME = "structured_output"
BATCH = 8
TARGET = 0.8
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
          "properties": {"items": {"type": "array", "minItems": 64,
                                   "items": {"type": "string", "maxLength": 24}}}}
SUITE_SIZES = {"full": (4, 16), "quick": (2, 8), "tiny": (1, 2)}  # (repeats, decode steps): steps each, alternated
TWIN_KV_BYTES = 128 << 20      # 8 sequences of ~40 prompt + MAX_TOKENS tokens fit
MAX_TOKENS = 256


def prompts(engine: Engine) -> list[list[int]]:
    topics = ("fruits", "rivers", "cities", "tools", "birds", "colors", "planets", "metals")
    return [engine.tokenizer.encode_chat([ChatMessage("user", f"List {topic} as JSON.")]) for topic in topics]


def twin_engines(engine: Engine) -> tuple[Engine, Engine]:
    """Two engines over `engine`'s model (the same weights, a pool each), so the two batches can run
    step by step in turn: load on the machine then hits both alike."""
    config = EngineConfig(kv_capacity_bytes=TWIN_KV_BYTES)
    return tuple(Engine(engine.model, engine.tokenizer, engine.model_digest, config) for _ in range(2))


def measure(engine: Engine, repeats: int, steps: int) -> dict:
    free = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    constrained = replace(free, structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    free_engine, json_engine = twin_engines(engine)
    json_engine.check_sampling(constrained)  # the tokenizer's grammar view and the schema, built before timing
    step_s = {"free": [], "json_schema": []}
    with running_batch(free_engine, prompts(engine), free) as free_steps, \
            running_batch(json_engine, prompts(engine), constrained) as json_steps:
        for _ in range(repeats * steps):  # alternated step by step
            step_s["free"].append(free_steps(1))
            step_s["json_schema"].append(json_steps(1))
        assert len(json_engine.running) == BATCH, "the schema closed early: the batch shrank"
        logits = torch.randn(BATCH, engine.model_config.vocab_size)
        pick_ms = {"free": median_seconds(lambda: pick(logits, free_engine.running), 20) * 1e3,
                   "json_schema": median_seconds(lambda: pick(logits, json_engine.running), 20) * 1e3}
    tok_s = {name: BATCH / statistics.median(times) for name, times in step_s.items()}
    return {"model": str(engine.model.config), "dtype": engine.layout.dtype, "batch": BATCH,
            "decode_steps_each": repeats * steps, "schema": SCHEMA,
            "decode_tok_s": {k: round(v, 1) for k, v in tok_s.items()},
            "token_choice_ms_per_step": {k: round(v, 2) for k, v in pick_ms.items()},
            "ratios": {"json_schema_over_free_decode_batch8": at_least(tok_s["json_schema"] / tok_s["free"], TARGET)}}


def run(ctx: BenchContext) -> dict:
    """The suite measure: bench/results/structured_output.json and .png."""
    repeats, steps = ctx.pick(SUITE_SIZES)
    progress(NAME, f"decode batch {BATCH}, free vs JSON Schema, {repeats * steps} steps each, alternated")
    result = measure(ctx.engine(), repeats, steps)
    progress(NAME, ", ".join(f"{k}: {v} tok/s" for k, v in result["decode_tok_s"].items())
             + "; token choice per step " + ", ".join(f"{k}: {v} ms" for k, v in result["token_choice_ms_per_step"].items()))
    result["gpu"] = gpu_note()
    ctx.write(NAME, result)
    bar_plot(ctx.results_dir / f"{NAME}.png", f"Decode at batch {BATCH}: free vs held to a JSON Schema", "tokens / s",
             list(result["decode_tok_s"]), {"tok/s": list(result["decode_tok_s"].values())})
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    repeats, steps = SUITE_SIZES["quick" if args.quick else "full"]
    engine = load_engine(args.model, None, EngineConfig(kv_capacity_bytes=512 << 20), "float32")
    result = {**measure(engine, repeats, steps), "quick": args.quick}
    path = write_result(NAME, result)
    ratio = result["ratios"]["json_schema_over_free_decode_batch8"]
    print(f"decode batch {BATCH}: {result['decode_tok_s']} (token choice per step, ms: "
          f"{result['token_choice_ms_per_step']}); JSON Schema / free {ratio['value']} "
          f"(target >= {TARGET:g}) -> {path}")
    return result


if __name__ == "__main__":
    main()
