"""Cache-aware routing vs round robin: multi-turn chat through the gateway over 2 decode replicas.

Each user (a thread, a closed loop) holds one conversation: a system prompt of its own, then
`turns` user messages; every turn's prompt is the whole history so far (earlier user messages and
the assistant's answers) plus the new message, sent with the official `openai` client, streamed
(TTFT = until the first content chunk). Two gateways front the same cluster, one per policy
(`--routing cache_aware` / `round_robin`); each phase uses fresh conversations, so neither finds
the other's blocks in a replica's own pool. A warm-up through both replicas comes first, and rounds
alternate which policy goes first, so neither pays the cold start alone.

The figure: the share of history tokens each turn found in the local prefix cache of the replica
that served it (usage.kvcluster.local_cache_tokens). History tokens of turn k = the full blocks of
the longest common prefix of its prompt and turn k-1's prompt (tokenized here with the served
model's tokenizer), i.e. what the replica that served turn k-1 certainly holds; a turn's local
tokens are counted up to that (the answer's own blocks may add a few more). Under round robin
a turn lands on the replica that served the previous one about half the time; the rest it must
pull from the store or compute. Target: cache-aware share >= 0.9. TTFT p50/p99 of both recorded.
"""

import random
import threading
import time
from dataclasses import dataclass

import openai

from bench.common import at_least, percentile, progress
from bench.context import BenchContext
from bench.plots import bar_plot
from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.model.files import read_tokenizer_data
from kvcluster.model.tokenizer import ChatMessage, Tokenizer

NAME = "routing"
POLICIES = ("cache_aware", "round_robin")
LOCAL_SHARE_TARGET = 0.9
BLOCK_SIZE = 16
WORDS = ("harbor", "ledger", "copper", "meadow", "signal", "orchard", "lantern", "granite", "falcon", "prairie",
         "cobalt", "willow", "tunnel", "saffron", "glacier", "compass", "velvet", "quarry", "thistle", "beacon")


@dataclass(frozen=True)
class Sizes:
    users: int
    turns: int
    system_words: int
    message_words: int
    max_tokens: int
    rounds: int


SIZES = {"full": Sizes(8, 4, 120, 24, 8, 2), "quick": Sizes(4, 3, 80, 16, 6, 2), "tiny": Sizes(2, 2, 40, 8, 2, 1)}


@dataclass
class Turn:
    ttft_s: float
    history_tokens: int
    local_tokens: int
    replica: str


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def run_user(client: openai.OpenAI, model: str, tokenizer: Tokenizer, rng: random.Random, sizes: Sizes,
             out: list[Turn]) -> None:
    messages = [{"role": "system", "content": f"You keep notes. {sentence(rng, sizes.system_words)}"}]
    previous: list[int] = []
    for _ in range(sizes.turns):
        messages.append({"role": "user", "content": sentence(rng, sizes.message_words)})
        prompt = tokenizer.encode_chat([ChatMessage(m["role"], m["content"]) for m in messages])
        common = next((i for i, (a, b) in enumerate(zip(prompt, previous)) if a != b), min(len(prompt), len(previous)))
        history = common // BLOCK_SIZE * BLOCK_SIZE
        start, first, text, usage = time.perf_counter(), None, [], None
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=sizes.max_tokens,
                                                    temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and first is None:
                first = time.perf_counter() - start
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        details = usage.kvcluster
        out.append(Turn(first, history, min(history, details["local_cache_tokens"]), details["replica"]))
        messages.append({"role": "assistant", "content": "".join(text)})
        previous = prompt


def run_phase(url: str, model: str, tokenizer: Tokenizer, sizes: Sizes, seed: int) -> list[Turn]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    turns: list[list[Turn]] = [[] for _ in range(sizes.users)]
    threads = [threading.Thread(target=run_user, args=(client, model, tokenizer, random.Random(seed * 1000 + u),
                                                       sizes, turns[u])) for u in range(sizes.users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [t for user in turns for t in user]


def summarize(turns: list[Turn]) -> dict:
    later = [t for t in turns if t.history_tokens]
    history = sum(t.history_tokens for t in later)
    ttfts = [t.ttft_s for t in turns]
    return {"requests": len(turns), "history_tokens": history, "local_cache_tokens": sum(t.local_tokens for t in later),
            "local_cache_share": round(sum(t.local_tokens for t in later) / history, 3) if history else 0.0,
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
            "requests_per_replica": {r: sum(t.replica == r for t in turns) for r in sorted({t.replica for t in turns})}}


def run(ctx: BenchContext) -> dict:
    sizes = ctx.pick(SIZES)
    log = open(ctx.scratch_dir / "routing-cluster.log", "a")
    with Cluster(ClusterPorts.any_free(), extra_env=ctx.cluster_env(), log_stream=log, dtype=ctx.dtype,
                 decode_replicas=2) as cluster:
        starting = {policy: cluster.launch(f"gateway-{policy}", [*cluster.gateway_child_args(), "--routing", policy])
                    for policy in POLICIES}  # at once: each spends seconds on its imports
        gateways = {policy: f"http://{cluster.host}:{cluster.wait_ready(child).grpc_port}"
                    for policy, child in starting.items()}
        tokenizer = Tokenizer(read_tokenizer_data(ctx.model))
        warm_up = Sizes(users=4, turns=1, system_words=8, message_words=4, max_tokens=2, rounds=1)
        run_phase(gateways["round_robin"], cluster.served_model, tokenizer, warm_up, seed=0)
        turns: dict[str, list[Turn]] = {policy: [] for policy in POLICIES}
        for rnd in range(sizes.rounds):
            for policy in (POLICIES if rnd % 2 == 0 else POLICIES[::-1]):
                seed = 1 + 2 * rnd + POLICIES.index(policy)  # fresh conversations every phase
                phase = run_phase(gateways[policy], cluster.served_model, tokenizer, sizes, seed)
                turns[policy] += phase
                row = summarize(phase)
                progress(NAME, f"round {rnd + 1}/{sizes.rounds} {policy:<12}: local-cache share of history "
                         f"{row['local_cache_share']:.2f}, TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms")
        result = {policy: summarize(turns[policy]) for policy in POLICIES}
    log.close()
    aware, rr = result["cache_aware"], result["round_robin"]
    payload = {"users": sizes.users, "turns": sizes.turns, "rounds": sizes.rounds, "decode_replicas": 2,
               "max_tokens": sizes.max_tokens,
               "result": result,
               "ratios": {"local_cache_share_cache_aware": at_least(aware["local_cache_share"], LOCAL_SHARE_TARGET, 3),
                          "local_cache_share_cache_aware_over_round_robin":
                              at_least(aware["local_cache_share"] / max(rr["local_cache_share"], 1e-3), 1.0)}}
    ctx.write(NAME, payload)
    bar_plot(ctx.results_dir / f"{NAME}.png", f"{sizes.users} users x {sizes.turns} turns, 2 decode replicas",
             "value (units in the group name)", ["local-cache share of history", "TTFT p50 (s)", "TTFT p99 (s)"],
             {policy: [result[policy]["local_cache_share"], result[policy]["ttft_p50_ms"] / 1000,
                       result[policy]["ttft_p99_ms"] / 1000] for policy in POLICIES})
    return payload
