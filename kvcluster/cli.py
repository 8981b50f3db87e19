"""Command line: `python -m kvcluster generate "prompt"` streams text from the in-process engine."""

import argparse
import sys
import time

from kvcluster.errors import KVClusterError
from kvcluster.model.engine import EngineConfig, load_engine
from kvcluster.model.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from kvcluster.model.tokenizer import ChatMessage


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvcluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="llama GGUF file (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--no-cache", action="store_true",
                     help="recompute the whole sequence for every token (the exactness reference)")
    add_sampling_flags(gen)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    engine = load_engine(args.model, args.device, EngineConfig(kv_capacity_bytes=256 << 20))
    tok = engine.tokenizer
    prompt_ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([ChatMessage("user", args.prompt)])
    params = sampling_from_args(args)
    stream = engine.generate_no_cache if args.no_cache else engine.generate
    start = time.perf_counter()
    count = 0
    for event in stream(prompt_ids, params):
        count += 1
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print(f"\n[{len(prompt_ids)} prompt tokens, {count} generated, {count / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": run_generate}[args.command](args)
    except KVClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
