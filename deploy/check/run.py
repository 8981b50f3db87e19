"""`make deploy-check`: builds the shipped image and proves the compose stack serves, on this machine.

Prepares what it needs (deploy/check/prepare.py), builds deploy/Dockerfile on a local Debian base,
brings up deploy/docker-compose.yml with deploy/check/compose.hostnet.yml on top (host network,
local stand-ins for Redis and Prometheus, no Grafana), then checks, in order: every health check
turns healthy; a prompt sent twice through gRPC and twice through the gateway (openai client) is
answered the second time from the cache, with the same text; Prometheus scrapes every service and
answers each query of the Grafana dashboard and each alert rule without error; a cache store killed
while requests run fails none of them. It tears the stack down and prints a summary either way.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import prepare
from prepare import DEPLOY, IMAGE, WORK, log

SOURCES = ["-f", str(DEPLOY / "docker-compose.yml"), "-f", str(DEPLOY / "check" / "compose.hostnet.yml")]
# The two files merged, less the published ports (compose 1.29 cannot drop them in an override, and
# a host-network container refuses them); git-ignored.
MERGED = DEPLOY / "check" / "compose.merged.yml"
COMPOSE = ["docker-compose", "-p", "kvccheck", "-f", str(MERGED)]
# vfs copies the whole image for each container it creates: minutes, not the default 60 s.
COMPOSE_ENV = {"COMPOSE_PROFILES": "cpu", "COMPOSE_HTTP_TIMEOUT": "900", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
# compose service -> (its address in deploy/prometheus/prometheus.yml, where it listens here)
METRICS = {"cache-store-0:9103": "127.0.0.1:19103", "cache-store-1:9103": "127.0.0.1:19104",
           "prefill:9102": "127.0.0.1:19102", "decode:9101": "127.0.0.1:19101", "gateway:8000": "127.0.0.1:18000",
           "localhost:9090": "127.0.0.1:19090"}
PORTS = (16379, 15051, 15052, 15053, 15054, 18000, 19090, 19101, 19102, 19103, 19104)
DECODE, GATEWAY, PROMETHEUS = "127.0.0.1:15051", "http://127.0.0.1:18000/v1", "http://127.0.0.1:19090"
SERVICES = ("redis", "cache-store-0", "cache-store-1", "prefill", "decode", "gateway", "prometheus")
KILLED_STORE = "cache-store-1"
HEALTH_TIMEOUT_S = 900
PROMPT = ("You are a concise assistant for a deployment runbook. Answer in one short sentence. "
          "Question: what does a health check in a container orchestrator tell the operator?")


def compose(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([*COMPOSE, *args], check=True, env=COMPOSE_ENV, cwd=DEPLOY,
                          capture_output=capture, text=True)


def ports_free() -> None:
    busy = []
    for port in PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    if busy:
        raise SystemExit(f"ports in use on 127.0.0.1: {busy} (deploy/check/compose.hostnet.yml picks them)")


def write_prometheus_config() -> None:
    """deploy/prometheus/prometheus.yml with each target moved to the port it has here, and its rules."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [METRICS[target] for target in group["targets"]]
    out = DEPLOY / "check" / "prometheus"
    out.mkdir(exist_ok=True)
    (out / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text())


def write_merged_compose() -> None:
    merged = yaml.safe_load(subprocess.run(["docker-compose", *SOURCES, "config"], check=True, env=COMPOSE_ENV,
                                           cwd=DEPLOY, capture_output=True, text=True).stdout)
    for service in merged["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    MERGED.write_text(yaml.safe_dump(merged, sort_keys=False))


def container(service: str) -> str:
    return compose("ps", "-q", service, capture=True).stdout.strip()


def inspect(container_id: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", template, container_id], check=True,
                          capture_output=True, text=True).stdout.strip()


def wait_healthy(services=SERVICES, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
    started = time.monotonic()
    ids = {service: container(service) for service in services}
    while True:
        states = {service: inspect(cid, "{{.State.Health.Status}}") for service, cid in ids.items()}
        if all(state == "healthy" for state in states.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not healthy after {timeout_s} s: {states}")
        time.sleep(3)


def grpc_twice(api_key: str) -> dict:
    from kvcluster.client import Client

    with Client(DECODE, api_key=api_key) as client:
        cold, warm = (client.generate(messages=[("user", PROMPT)], max_tokens=24, temperature=0) for _ in range(2))
    assert cold.text and warm.text == cold.text, (cold.text, warm.text)
    assert warm.usage.cached_tokens > 0, f"the warm gRPC answer used no cached tokens ({warm.usage})"
    return {"text": warm.text, "cold_cached": cold.usage.cached_tokens, "warm_cached": warm.usage.cached_tokens,
            "prompt_tokens": warm.usage.prompt_tokens}


def samples(name: str, addresses: tuple[str, ...]) -> list:
    """A metric's samples read from the services' /metrics (no scrape delay)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for address in addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            for family in text_string_to_metric_families(reply.read().decode()):
                found += [s for s in family.samples if s.name == name]
    return found


def store_counter(name: str) -> float:
    return sum(s.value for s in samples(name, ("127.0.0.1:19103", "127.0.0.1:19104")))


def served_by_a_store(api_key: str, expected_text: str) -> dict:
    """Decode's own prefix cache dropped (the gateway's POST /reset_prefix_cache), the same prompt
    again: its prefix now comes from a cache store, and the answer is the same."""
    from kvcluster.client import Client

    deadline = time.monotonic() + 60
    while store_counter("kvcluster_store_blocks_stored_total") < 3:  # the prompt's 3 full blocks, pushed behind
        assert time.monotonic() < deadline, "the prompt's blocks never reached a cache store"
        time.sleep(1)
    reset = urllib.request.Request(GATEWAY.removesuffix("/v1") + "/reset_prefix_cache", method="POST",
                                   headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(reset, timeout=30) as reply:
        assert reply.status == 200, reply.status
    hits_before = store_counter("kvcluster_store_hit_blocks_total")
    with Client(DECODE, api_key=api_key) as client:
        third = client.generate(messages=[("user", PROMPT)], max_tokens=24, temperature=0)
    hits = store_counter("kvcluster_store_hit_blocks_total") - hits_before
    assert third.text == expected_text, (third.text, expected_text)
    assert third.usage.cached_tokens > 0 and hits > 0, f"not served from a store ({third.usage}, {hits} hit blocks)"
    return {"cached_tokens": third.usage.cached_tokens, "store_hit_blocks": int(hits)}


def gateway_twice(api_key: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=GATEWAY, api_key=api_key)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": PROMPT + " (gateway)"}]
    cold, warm = (client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
                  for _ in range(2))
    cold_text, warm_text = cold.choices[0].message.content, warm.choices[0].message.content
    assert cold_text and warm_text == cold_text, (cold_text, warm_text)
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached and cached > 0, f"the warm gateway answer used no cached tokens ({warm.usage})"
    return {"model": model, "text": warm_text, "warm_cached": cached, "prompt_tokens": warm.usage.prompt_tokens}


def prometheus_query(expr: str) -> dict:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def check_prometheus() -> dict:
    """Every target up, then every dashboard query and alert expression evaluated without error."""
    sys.path.insert(0, str(DEPLOY.parent))
    from tests import deploy_tools as dt

    deadline = time.monotonic() + 120
    while True:
        up = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1]
              for s in prometheus_query("up")["data"]["result"]}
        if len(up) == len(METRICS) and all(v == "1" for v in up.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus targets not all up: {up}")
        time.sleep(3)
    queries = {**dt.dashboard_queries(), **{f"alert {k}": v for k, v in dt.alert_queries().items()}}
    failed = {}
    for name, expr in queries.items():
        answer = prometheus_query(dt.concrete_promql(expr))
        if answer.get("status") != "success":
            failed[name] = answer.get("error")
    assert not failed, f"queries Prometheus rejected: {failed}"
    jobs = sorted({job for job, _ in up})
    stored = metric_sum("kvcluster_store_blocks_stored_total")
    return {"targets_up": len(up), "jobs": jobs, "queries_ok": len(queries), "store_blocks_stored": stored,
            "store_hit_blocks": metric_sum("kvcluster_store_hit_blocks_total")}


def metric_sum(name: str) -> int:
    result = prometheus_query(f"sum({name})")["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def check_logs() -> dict:
    """The services' own words: the image's prebuilt C++ ops load (no fallback to the torch path) and
    nothing died with a traceback (the killed store's restart aside, its log is checked the same)."""
    problems = {}
    for service in ("cache-store-0", "cache-store-1", "prefill", "decode", "gateway"):
        logs = subprocess.run(["docker", "logs", container(service)], capture_output=True, text=True)
        text = logs.stdout + logs.stderr
        found = [line for line in text.splitlines()
                 if "compiled kernels unavailable" in line or "Traceback" in line or "Read-only file system" in line]
        if found:
            problems[service] = found[:3]
    assert not problems, f"service logs: {problems}"
    for service in ("cache-store-0", "cache-store-1", "prefill", "decode", "gateway"):
        settings = inspect(container(service), "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}")
        assert settings == "10001 true", f"{service}: user and read-only root are {settings}"
    return {"services_checked": 5, "kernel_fallbacks_or_tracebacks": 0, "user_10001_read_only_root": True}


def kill_store_under_load(api_key: str) -> dict:
    """Eight requests of 96 tokens in flight, then SIGKILL to one store's process (a crash, so the restart policy
    brings it back); every request must still succeed, and the store must come back healthy."""
    from kvcluster.client import Client

    def one(n: int) -> str:
        with Client(DECODE, api_key=api_key) as client:
            return client.generate(prompt=f"{PROMPT} Variant {n}: answer for team {n}.", max_tokens=96,
                                   min_tokens=96, temperature=0).text

    pid = int(inspect(container(KILLED_STORE), "{{.State.Pid}}"))
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, n) for n in range(8)]
        time.sleep(1)
        in_flight = sum(not future.done() for future in futures)
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
        texts = [future.result() for future in futures]  # raises on any failed request
    assert all(texts), texts
    assert in_flight > 0, "no request was in flight when the store was killed"
    back_s = wait_healthy([KILLED_STORE], timeout_s=300)
    restarts = int(inspect(container(KILLED_STORE), "{{.RestartCount}}"))
    assert restarts >= 1, "the killed store was not restarted"
    fallbacks: dict[str, int] = {}
    for sample in samples("kvcluster_fallbacks_total", ("127.0.0.1:19101", "127.0.0.1:19102")):
        if sample.value:
            reason = sample.labels.get("reason", "")
            fallbacks[reason] = fallbacks.get(reason, 0) + int(sample.value)
    return {"requests": len(texts), "in_flight_at_kill": in_flight, "failed": 0, "store_back_healthy_s": round(back_s, 1),
            "fallbacks_by_reason": fallbacks or "none"}


def main() -> int:
    started = time.monotonic()
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    prepare.prepare()
    summary["prepare_s"] = round(time.monotonic() - started, 1)
    WORK.mkdir(parents=True, exist_ok=True)
    summary["build_s"] = round(prepare.build_image(WORK / "build.log"), 1)
    summary["image_size_mb"] = round(prepare.image_size_bytes(IMAGE) / 1e6)
    ports_free()
    write_prometheus_config()
    write_merged_compose()
    api_key = (DEPLOY / "secrets" / "api_key").read_text().strip()
    steps = {"health": lambda: {"all_healthy_s": round(wait_healthy(), 1)},
             "grpc": lambda: grpc_twice(api_key),
             "after_reset_from_store": lambda: served_by_a_store(api_key, summary["grpc"]["text"]),
             "gateway": lambda: gateway_twice(api_key),
             "prometheus": check_prometheus, "store_killed_under_load": lambda: kill_store_under_load(api_key),
             "logs": check_logs}
    ok = False
    try:
        up_started = time.monotonic()
        compose("up", "-d", "--no-build")
        summary["compose_up_s"] = round(time.monotonic() - up_started, 1)
        for name, step in steps.items():
            log(f"step {name}")
            summary[name] = step()
        ok = True
    except Exception as exc:
        summary["failed"] = f"{type(exc).__name__}: {exc}"
        compose("ps")
        subprocess.run([*COMPOSE, "logs", "--tail", "40"], env=COMPOSE_ENV, cwd=DEPLOY)
    finally:
        if os.environ.get("KVC_DEPLOY_CHECK_KEEP") != "1":  # 1: leave the stack up to look at it
            compose("down", "-v", "--remove-orphans")
    summary["not_run"] = "Grafana: no registry to pull grafana/grafana from and no Debian package; its dashboard's queries ran against Prometheus instead"
    summary["total_s"] = round(time.monotonic() - started, 1)
    summary["result"] = "PASS" if ok else "FAIL"
    print("\n=== deploy-check summary ===\n" + yaml.safe_dump(summary, sort_keys=False, width=200), flush=True)
    (WORK / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
