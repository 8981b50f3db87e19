"""Metrics after real traffic on a real local cluster, scraped directly and by a real Prometheus."""

import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from kvcluster.cli.launcher import Cluster, ClusterPorts
from kvcluster.cli.redis_server import free_port
from kvcluster.client import Client
from tests.deploy_tools import (SCRAPED_METRICS, alert_queries, concrete_promql, dashboard_panels, dashboard_queries,
                                dashboard_rows, ensure_tools, load_dashboard, metric_family, metrics_named)

JOBS = {"cache_store": "cache_store", "prefill": "prefill_service", "decode": "decode_service", "gateway": "gateway"}
# Dashboard rows every one of whose queries must return data after the traffic of one scrape window.
ROWS_WITH_DATA = ("Scheduler", "Gateway")
DOCUMENT = " ".join(f"Clause {i}: the carrier is liable for loss up to {i * 3} units of account per kilogram."
                    for i in range(1, 12))


# A multi-process cluster, loaded, then scraped by a real Prometheus.
pytestmark = pytest.mark.slow

def metrics_port(cluster: Cluster, job: str) -> int:
    """The port Prometheus scrapes `job` on: the gateway serves /metrics on its HTTP port."""
    child = cluster.children[JOBS[job]]
    return child.grpc_port if job == "gateway" else child.metrics_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample_value(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def sample_total(text: str, name: str) -> float:
    """Sum of `name` over all its label sets."""
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"{name} ") or line.startswith(f"{name}{{"))


def families(text: str) -> set[str]:
    return {metric_family(line.split("{")[0].split()[0]) for line in text.splitlines() if line and line[0] != "#"}


@pytest.fixture(scope="module")
def live():
    with tempfile.TemporaryDirectory() as logs, open(Path(logs) / "cluster.log", "w") as log:
        # Disaggregation forced: on one machine auto keeps prompts local, and the prefill path must move too.
        with Cluster(ClusterPorts.any_free(), log_stream=log, extra_env={"KVC_DISAGGREGATION": "always"},
                     gateway=True) as cluster:
            with Client(cluster.decode_target) as client:
                messages = [("system", DOCUMENT), ("user", "What is the liability in clause 4?")]
                for _ in range(3):  # cold, then warm twice: hits, pulls, pushes, TTFT, ITL
                    result = client.generate(messages=messages, max_tokens=6, temperature=0.0)
                assert result.usage.cached_tokens > 0
            # one answered gateway request (no generation: the decode counts below stay those of the gRPC calls)
            assert httpx.get(f"{cluster.gateway_url}/v1/models", timeout=30).status_code == 200
            yield cluster


def test_every_service_exports_its_metrics_and_they_moved(live):
    texts = {job: scrape(metrics_port(live, job)) for job in JOBS}
    for job, expected in SCRAPED_METRICS.items():
        missing = set(expected) - families(texts[job])
        assert not missing, f"{job} lacks {sorted(missing)}"
    store, prefill, decode, gateway = texts["cache_store"], texts["prefill"], texts["decode"], texts["gateway"]
    assert sample_value(store, "kvcluster_store_hit_blocks_total") > 0
    assert sample_value(store, "kvcluster_transfer_bytes_total", 'direction="push"') > 0
    assert sample_value(store, "kvcluster_transfer_bytes_total", 'direction="pull"') > 0
    assert sample_value(prefill, "kvcluster_prefill_tokens_total", 'source="computed"') > 0
    # cold: the prefill service computed the prompt; warm twice: the decode worker's own pool held it
    assert sample_value(decode, "kvcluster_prompt_tokens_total", 'source="prefill"') > 0
    assert sample_value(decode, "kvcluster_prompt_tokens_total", 'source="local_cache"') > 0
    assert sample_value(decode, "kvcluster_time_to_first_token_seconds_count") == 3
    assert sample_value(decode, "kvcluster_requests_total", 'outcome="ok"') == 3
    assert sample_value(decode, "kvcluster_generation_tokens_total") == 18
    # one index lookup for the cold request; the warm ones found everything in the worker's pool
    assert sample_value(decode, "kvcluster_index_lookup_seconds_count") >= 1
    assert sample_value(decode, "kvcluster_worker_kv_blocks_cached") > 0
    # the scheduler: prefill computed the cold prompt, decode its tokens, each step within its budget
    for text in (prefill, decode):
        assert sample_value(text, "kvcluster_scheduler_step_budget_tokens") > 0
        assert sample_total(text, "kvcluster_scheduler_steps_total") > 0
        assert sample_value(text, "kvcluster_scheduler_budget_used_ratio_count") > 0
        assert sample_value(text, "kvcluster_scheduler_budget_used_ratio_bucket", 'le="1.0"') == \
            sample_value(text, "kvcluster_scheduler_budget_used_ratio_count")
    assert sample_value(prefill, "kvcluster_scheduler_tokens_total", 'kind="prefill"') > 0
    assert sample_value(decode, "kvcluster_scheduler_tokens_total", 'kind="decode"') > 0
    # disaggregation always: the cold prompt was sent to the prefill service, and counted so
    assert sample_value(decode, "kvcluster_prefill_decisions_total", 'reason="threshold",where="remote"') >= 1
    assert sample_value(gateway, "kvcluster_gateway_requests_total", 'route="/v1/models",status="200"') == 1
    assert sample_value(gateway, "kvcluster_gateway_replicas_up") == 1


def test_workers_export_their_numerics_batch_invariant_by_default(live):
    for job in ("prefill", "decode"):
        text = scrape(live.children[JOBS[job]].metrics_port)
        assert sample_value(text, "kvcluster_numerics_info", 'guaranteed="true",mode="batch-invariant"') == 1, job
        assert 'mode="fast"' not in text, job


def test_dashboard_metrics_exist_in_a_live_scrape(live):
    live_names = set().union(*(families(scrape(metrics_port(live, job))) for job in JOBS))
    named = {metric_family(n) for n in metrics_named(list(dashboard_queries().values()) + list(alert_queries().values()))}
    assert named and named <= live_names, f"not exported: {sorted(named - live_names)}"
    for panel in dashboard_panels(load_dashboard()):
        assert panel.get("datasource") and panel.get("targets"), panel.get("title")


def test_real_prometheus_scrapes_the_cluster_and_panels_return_data(live):
    ensure_tools()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [
                      {"targets": [f"127.0.0.1:{metrics_port(live, job)}"]}]} for job in JOBS]}
        (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
        server = subprocess.Popen(["prometheus", f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            with Client(live.decode_target) as client:  # traffic inside the scrape window, for rate()
                wait_for(port, 'up{job="decode"} == 1')
                wait_for(port, 'up{job="gateway"} == 1')
                for i in range(3):  # cold prompts (a new first block): prefill, pushes, store pulls
                    client.generate(messages=[("system", f"Case file {i}. {DOCUMENT}"),
                                              ("user", f"Summarise clause {i + 2}.")], max_tokens=4, temperature=0.0)
            gateway = openai.OpenAI(base_url=f"{live.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
            answer = gateway.chat.completions.create(  # through the gateway: routing, its TTFT and latency
                model=live.served_model, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": f"Case file 9. {DOCUMENT}"},
                          {"role": "user", "content": "Summarise clause 9."}])
            assert answer.choices[0].message.content
            queries = {**dashboard_queries(), **alert_queries()}
            for name, expr in queries.items():
                status, _ = query(port, concrete_promql(expr))
                assert status == "success", f"{name}: {expr}"
            hit_ratio = next(e for n, e in dashboard_queries().items() if "hit ratio" in n.lower())
            ttft = next(e for n, e in dashboard_queries().items() if "ttft" in n.lower() or "first token" in n.lower())
            for expr in (hit_ratio, ttft):
                assert wait_for(port, concrete_promql(expr)), f"no data for {expr}"
            rows = dashboard_rows(load_dashboard())
            for row in ROWS_WITH_DATA:
                assert rows.get(row), f"the dashboard has no {row!r} row"
                for panel in rows[row]:
                    for target in panel["targets"]:
                        expr = concrete_promql(target["expr"])
                        assert wait_for(port, expr), f"{row} / {panel['title']} / {target['refId']}: no data for {expr}"
        finally:
            server.terminate()
            server.wait(20)


def query(port: int, expr: str) -> tuple[str, list]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    return body["status"], body.get("data", {}).get("result", [])


def wait_for(port: int, expr: str, timeout_s: float = 60.0) -> bool:
    """True once `expr` returns at least one non-NaN sample."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, result = query(port, expr)
            if any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result):
                return True
        except OSError:
            pass
        time.sleep(1)
    return False
