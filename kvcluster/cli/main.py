"""Command line of kvcluster (`python -m kvcluster ...`).

  generate "prompt"                 stream text from the in-process engine (--no-cache: the exactness reference)
  generate --target HOST:PORT "..." stream text from a running cluster and print the usage line
  chat --target HOST:PORT           interactive multi-turn chat against a cluster
  up [--model PATH|NAME]            start Redis, a cache store, prefill and decode replicas and the
                                    OpenAI HTTP gateway on this machine
  demo                              send one long prompt twice and print cold vs warm TTFT
  verify --target HOST:PORT         serve a prompt set cold, warm and with the cache bypassed; compare tokens
"""

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from kvcluster.client import Client, Completion
from kvcluster.engine.sampling_params import (MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_STOP_STRING_CHARS,
                                             MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_P, MIN_REPETITION_PENALTY,
                                             MIN_TEMPERATURE, MIN_TOP_P, SEED_LIMIT, SamplingParams, StructuredOutput)
from kvcluster.errors import KVClusterError
from kvcluster.kv.dtypes import DTYPE_CHOICES
from kvcluster.model.tokenizer import ChatMessage
from kvcluster.rpc.messages import sampling_to_proto

MODEL_HELP = ("GGUF file, Hugging Face checkpoint directory (llama, mistral, qwen2, qwen3, gemma3) or a shipped "
              "model's name (smollm2, gemma3)")
DEMO_DOCUMENT = " ".join(
    f"Section {i}: the warehouse in region {i % 7} ships {40 + i} pallets a day, keeps {i % 5 + 2} loading docks "
    f"open, and reports delays above {i % 3 + 1} hours to the dispatcher on duty." for i in range(1, 40))


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling flags; defaults and the bounds named in their help are SamplingParams' own."""
    defaults, penalty = SamplingParams(), f"[{-MAX_PENALTY:g}, {MAX_PENALTY:g}]"
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help=f"0 = greedy (default), else [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help=f"[{MIN_TOP_P:g}, {MAX_TOP_P:g}]")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"[0, 2^{SEED_LIMIT.bit_length() - 1})")
    parser.add_argument("--stop", action="append", default=[],
                        help=f"stop string (repeatable, at most {MAX_STOP_STRINGS} of {MAX_STOP_STRING_CHARS} characters)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty, help=penalty)
    parser.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty, help=penalty)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                        help=f"[{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]; 1 = off")
    parser.add_argument("--min-tokens", type=int, default=defaults.min_tokens, help="hold back EOS until this many tokens")
    parser.add_argument("--json-schema", default=None, metavar="SCHEMA",
                        help="hold the output to this JSON Schema (JSON text, or @FILE); '{}' for any JSON object")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
                          structured=structured_from_flag(args.json_schema))


def structured_from_flag(schema: str | None) -> StructuredOutput | None:
    if schema is None:
        return None
    text = Path(schema[1:]).read_text() if schema.startswith("@") else schema
    return StructuredOutput("json_object") if text.strip() == "{}" else StructuredOutput("json_schema", text)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The same flags as SamplingParams proto fields, for the client."""
    message = sampling_to_proto(sampling_from_args(args))
    return {field.name: value for field, value in message.ListFields()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvcluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--target", default=None, help="decode service host:port (default: in-process engine)")
    gen.add_argument("--model", default=os.environ.get("KVC_MODEL") or None,
                     help=f"{MODEL_HELP} for the in-process engine (env KVC_MODEL; default: SmolLM2)")
    gen.add_argument("--device", default=None, help="cpu or cuda for the in-process engine")
    add_dtype_flag(gen, "the in-process engine's model and KV dtype")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--no-cache", action="store_true",
                     help="in-process: recompute the whole sequence for every token (the exactness reference); "
                          "with --target: bypass the cluster's KV cache")
    add_sampling_flags(gen)
    gen.add_argument("--api-key", default=os.environ.get("KVC_API_KEY"), help="Generate API key (env KVC_API_KEY)")
    add_cache_salt_flag(gen)
    chat = commands.add_parser("chat", help="interactive multi-turn chat against a cluster")
    chat.add_argument("--target", default="127.0.0.1:50051")
    chat.add_argument("--api-key", default=os.environ.get("KVC_API_KEY"), help="Generate API key (env KVC_API_KEY)")
    add_cache_salt_flag(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(chat)
    up = commands.add_parser("up", help="run the whole cluster on this machine until Ctrl-C")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--any-ports", action="store_true", help="free ports instead of 50051-50053 / 9101-9103 / 8000")
    up.add_argument("--decode-replicas", type=int, default=1, help="decode workers (replica i on port 50051 + 10 i)")
    up.add_argument("--prefill-replicas", type=int, default=1, help="prefill workers (replica i on port 50052 + 10 i)")
    up.add_argument("--no-gateway", dest="gateway", action="store_false", help="do not start the HTTP gateway")
    up.add_argument("--redis-mode", choices=("single", "sentinel", "cluster"), default="single",
                    help="without KVC_REDIS_URL: one private redis-server (single), a private primary, replica "
                         "and three Sentinels that the services follow through a failover (sentinel), or a "
                         "private Redis Cluster of 3 masters with a replica each (cluster)")
    up.add_argument("--routing", choices=("cache_aware", "round_robin", "least_loaded"), default="cache_aware",
                    help="the gateway's routing policy")
    add_dtype_flag(up, "model and KV dtype of every service (the stores hold the same)")
    up.add_argument("--model", default=os.environ.get("KVC_MODEL", ""),
                    help=f"{MODEL_HELP} every worker serves (env KVC_MODEL; default: SmolLM2-135M-Instruct)")
    demo = commands.add_parser("demo", help="the same long prompt twice: cold vs warm time to first token")
    demo.add_argument("--target", default=None, help="a running cluster (default: start one)")
    add_dtype_flag(demo, "dtype of the cluster the demo starts")
    verify = commands.add_parser("verify", help="check on demand that the cache never changes a token: each "
                                 "prompt served cold, warm and with the cache bypassed, outputs compared")
    verify.add_argument("--target", default="127.0.0.1:50051", help="decode service host:port")
    verify.add_argument("--prompts", default=None, help="file with one prompt per line (default: a built-in set "
                        "of 8 prompts, 20 to 900 tokens)")
    verify.add_argument("--raw", action="store_true", help="send prompts as is, without the chat template")
    verify.add_argument("--api-key", default=os.environ.get("KVC_API_KEY"), help="Generate API key (env KVC_API_KEY)")
    add_cache_salt_flag(verify)
    add_sampling_flags(verify)
    verify.set_defaults(max_tokens=32, ignore_eos=True)
    return parser


def add_cache_salt_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-salt", default=os.environ.get("KVC_CACHE_SALT", ""),
                        help="share cached prompt blocks only with requests of this salt, e.g. one per tenant "
                             "(env KVC_CACHE_SALT; at most 256 characters; a cluster --target only)")


def add_dtype_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=os.environ.get("KVC_DTYPE", "auto"),
                        help=f"{what}: auto picks the fastest the hardware runs natively (env KVC_DTYPE; default auto)")


def run_generate(args: argparse.Namespace) -> int:
    if args.target:
        return run_generate_remote(args)
    from kvcluster.engine.engine import EngineConfig, load_engine  # torch loads only when needed

    engine = load_engine(args.model, args.device, EngineConfig(kv_capacity_bytes=256 << 20), args.dtype)
    tok = engine.tokenizer
    prompt_ids = tok.encode_prompt(args.prompt) if args.raw else tok.encode_chat([ChatMessage("user", args.prompt)])
    stream = engine.generate_no_cache if args.no_cache else engine.generate
    start, count = time.perf_counter(), 0
    for event in stream(prompt_ids, sampling_from_args(args)):
        count += 1
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    print(f"\n[{len(prompt_ids)} prompt tokens, {count} generated, {count / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def usage_line(completion: Completion) -> str:
    u = completion.usage
    return (f"[{u.prompt_tokens} prompt tokens: {u.cached_tokens} cached ({u.local_cache_tokens} in decode's pool, "
            f"{u.store_tokens} from the store), {u.computed_tokens} computed ({u.prefill_tokens} by prefill, "
            f"{u.local_computed_tokens} by decode); "
            f"{u.completion_tokens} generated; TTFT {u.timing.first_token_ms:.0f} ms; "
            f"{u.bytes_pulled / 1e6:.1f} MB pulled from cache; finish {completion.finish_reason}]")


def stream_to_stdout(client: Client, **request) -> Completion:
    completion = Completion()
    for response in client.stream(**request):
        completion.add(response)
        sys.stdout.write(response.text)
        sys.stdout.flush()
    print()
    return completion


def run_generate_remote(args: argparse.Namespace) -> int:
    request = {"prompt": args.prompt} if args.raw else {"messages": [("user", args.prompt)]}
    with Client(args.target, api_key=args.api_key) as client:
        completion = stream_to_stdout(client, bypass_cache=args.no_cache, cache_salt=args.cache_salt, **request,
                                      **sampling_kwargs(args))
    print(usage_line(completion), file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    history = [("system", args.system)] if args.system else []
    print("Chat with kvcluster; an empty line or Ctrl-D quits.", file=sys.stderr)
    with Client(args.target, api_key=args.api_key) as client:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            history.append(("user", line))
            sys.stdout.write("assistant> ")
            completion = stream_to_stdout(client, messages=history, cache_salt=args.cache_salt, **sampling_kwargs(args))
            history.append(("assistant", completion.text))
            print(usage_line(completion), file=sys.stderr)
    return 0


def run_up(args: argparse.Namespace) -> int:
    from kvcluster.cli.launcher import Cluster, ClusterPorts

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    ports = ClusterPorts.any_free() if args.any_ports else ClusterPorts()
    with Cluster(ports, host=args.host, dtype=args.dtype, model=args.model, decode_replicas=args.decode_replicas,
                 prefill_replicas=args.prefill_replicas, gateway=args.gateway,
                 gateway_args=("--routing", args.routing), redis_mode=args.redis_mode) as cluster:
        print(cluster.describe(), flush=True)
        while not stopping.wait(0.5):
            dead = [c.name for c in cluster.children.values() if c.process.poll() is not None]
            if dead:
                print(f"kvcluster: {', '.join(dead)} exited; stopping the cluster", file=sys.stderr)
                return 1
        print("kvcluster: stopping", flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    if args.target:
        return demo_against(args.target)
    from kvcluster.cli.launcher import Cluster, ClusterPorts

    with Cluster(ClusterPorts.any_free(), log_stream=open("/dev/null", "w"), dtype=args.dtype) as cluster:
        return demo_against(cluster.decode_target)


def demo_against(target: str) -> int:
    messages = [("system", "Answer from the document below.\n" + DEMO_DOCUMENT),
                ("user", "Which region does section 12 belong to?")]
    with Client(target) as client:
        runs = [client.generate(messages=messages, max_tokens=16, temperature=0.0) for _ in range(2)]
    for label, c in zip(("cold", "warm"), runs):
        print(f"{label}: TTFT {c.usage.timing.first_token_ms:8.1f} ms  ({c.usage.cached_tokens}/{c.usage.prompt_tokens} "
              f"prompt tokens cached)  -> {c.text!r}")
    cold, warm = (c.usage.timing.first_token_ms for c in runs)
    print(f"warm TTFT is {cold / max(warm, 1e-3):.1f}x faster; same text: {runs[0].text == runs[1].text}")
    return 0


def verify_prompts(path: str | None) -> list[str]:
    if path:
        with open(path, encoding="utf-8") as lines:
            return [line.rstrip("\n") for line in lines if line.strip()]
    sections = DEMO_DOCUMENT.split("Section ")
    return ["What is a KV cache?", "Write a haiku about caches that never lie."] + [
        "Section ".join(sections[:n]) + f" Which region ships the most pallets? (asked {n})" for n in (3, 6, 10, 15, 22, 30)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return diff if diff is not None or len(a) == len(b) else min(len(a), len(b))


def run_verify(args: argparse.Namespace) -> int:
    """Each prompt three times through the cluster: cold (or whatever the cache holds), warm, and with
    the cache bypassed (computed from scratch). Any difference in tokens is a cache bug."""
    kwargs = sampling_kwargs(args)
    if args.temperature > 0 and args.seed is None:
        kwargs["seed"] = 20261125  # sampled runs are comparable only with one seed
    bad = 0
    with Client(args.target, api_key=args.api_key) as client:
        for number, text in enumerate(verify_prompts(args.prompts), 1):
            request = dict(prompt=text) if args.raw else dict(messages=[("user", text)])
            first, warm = (client.generate(**request, cache_salt=args.cache_salt, **kwargs) for _ in range(2))
            fresh = client.generate(**request, bypass_cache=True, cache_salt=args.cache_salt, **kwargs)
            diffs = {label: first_difference(list(c.token_ids), list(fresh.token_ids))
                     for label, c in (("first", first), ("warm", warm))}
            u = warm.usage
            if all(d is None for d in diffs.values()):
                print(f"ok        #{number}: {u.prompt_tokens} prompt tokens ({u.cached_tokens} cached when warm), "
                      f"{len(fresh.token_ids)} output tokens identical")
                continue
            bad += 1
            where = ", ".join(f"{label} run differs at output token {d}" for label, d in diffs.items() if d is not None)
            print(f"MISMATCH  #{number}: {u.prompt_tokens} prompt tokens: {where} from the uncached run")
    total = len(verify_prompts(args.prompts))
    print(f"{total - bad}/{total} prompts identical cold, warm and uncached")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"generate": run_generate, "chat": run_chat, "up": run_up, "demo": run_demo, "verify": run_verify}
    try:
        return commands[args.command](args)
    except KVClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
