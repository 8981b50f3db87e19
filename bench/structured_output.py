"""The cost of structured output: decode tok/s of 8 sequences held to a JSON Schema ÷ the same 8 free,
in-process, measured side by side (alternating repeats, the same prompts and steps).

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

import torch

from bench.common import at_least, median_seconds, progress, write_result
from bench.context import BenchContext, gpu_note
from bench.engine import running_batch
from bench.plots import bar_plot
from kvcluster.model.engine import Engine, EngineConfig, load_engine
from kvcluster.model.logits_processors import pick
from kvcluster.model.sampling_params import SamplingParams, StructuredOutput
from kvcluster.model.tokenizer import ChatMessage

NAME = "structured_output"
BATCH = 8
TARGET = 0.8
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
          "properties": {"items": {"type": "array", "minItems": 64,
                                   "items": {"type": "string", "maxLength": 24}}}}
SUITE_SIZES = {"full": (5, 16), "quick": (2, 8), "tiny": (1, 2)}  # (repeats, decode steps)


def prompts(engine: Engine) -> list[list[int]]:
    topics = ("fruits", "rivers", "cities", "tools", "birds", "colors", "planets", "metals")
    return [engine.tokenizer.encode_chat([ChatMessage("user", f"List {topic} as JSON.")]) for topic in topics]


def decode_tok_s(engine: Engine, params: SamplingParams, steps: int) -> tuple[float, float]:
    """(decode tok/s of the batch, ms of one step's token choice alone: the logits step with its masks)."""
    with running_batch(engine, prompts(engine), params) as time_steps:
        tok_s = BATCH * steps / median_seconds(lambda: time_steps(steps), 1)
        logits = torch.randn(len(engine.running), engine.model_config.vocab_size)
        pick_ms = median_seconds(lambda: pick(logits, engine.running), 10) * 1e3  # pick changes no state
    return tok_s, pick_ms


def measure(engine: Engine, repeats: int, steps: int) -> dict:
    free = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True,
                                 structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    engine.check_sampling(constrained)  # the tokenizer's grammar view and the schema, built before timing
    runs = {"free": [], "json_schema": []}
    for _ in range(repeats):  # alternated, so both see the same machine load
        for name, params in (("free", free), ("json_schema", constrained)):
            runs[name].append(decode_tok_s(engine, params, steps))
    tok_s = {name: statistics.median(t for t, _ in values) for name, values in runs.items()}
    pick_ms = {name: statistics.median(ms for _, ms in values) for name, values in runs.items()}
    return {"model": str(engine.model.config), "dtype": engine.layout.dtype, "batch": BATCH, "repeats": repeats,
            "steps": steps, "schema": SCHEMA, "decode_tok_s": {k: round(v, 1) for k, v in tok_s.items()},
            "token_choice_ms_per_step": {k: round(v, 2) for k, v in pick_ms.items()},
            "ratios": {"json_schema_over_free_decode_batch8": at_least(tok_s["json_schema"] / tok_s["free"], TARGET)}}


def run(ctx: BenchContext) -> dict:
    """The suite measure: bench/results/structured_output.json and .png."""
    repeats, steps = ctx.pick(SUITE_SIZES)
    progress(NAME, f"decode batch {BATCH}, free vs JSON Schema, {repeats} repeats of {steps} steps")
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
