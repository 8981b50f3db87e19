"""`python -m kvcluster up` starts the whole cluster as processes and stops it cleanly."""

import re
import signal
import subprocess
import sys
import time

import psutil

from kvcluster.client import Client


def read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} not seen; output:\n{''.join(lines)}")


def test_up_serves_generate_and_stops_without_orphans():
    env_free = {k: v for k, v in __import__("os").environ.items() if k != "KVC_REDIS_URL"}
    up = subprocess.Popen([sys.executable, "-m", "kvcluster", "up", "--any-ports", "--dtype", "float32"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env_free)
    try:
        lines = read_until(up, "Ctrl-C stops the cluster", timeout_s=240)
        text = "".join(lines)
        for name in ("cache_store", "prefill_service", "decode_service"):
            assert f"[{name}] " in text  # each child's log lines carry its name
        port = int(re.search(r"decode_service\s+grpc 127\.0\.0\.1:(\d+)", text).group(1))
        assert re.search(r"prefill_service\s+grpc .* metrics http://127\.0\.0\.1:\d+/metrics", text)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # redis-server, cache store, prefill, decode
        with Client(f"127.0.0.1:{port}") as client:
            result = client.generate(prompt="The capital of France is", max_tokens=5, temperature=0.0)
        assert result.usage.completion_tokens == 5 and result.text
        # The CLI against the same cluster: streamed text plus the usage line; then a two-turn chat.
        cli = [sys.executable, "-m", "kvcluster"]
        gen = subprocess.run([*cli, "generate", "--target", f"127.0.0.1:{port}", "--max-tokens", "8",
                              "What is the capital of France?"], capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr
        assert "Paris" in gen.stdout and re.search(r"\d+ prompt tokens: \d+ cached \(\d+ in decode's pool, \d+ from the store\), "
                                                       r"\d+ computed \(\d+ by prefill, \d+ by decode\)", gen.stderr)
        chat = subprocess.run([*cli, "chat", "--target", f"127.0.0.1:{port}", "--max-tokens", "6"],
                              input="Hi there!\nWhat did I just say?\n\n", capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.count("assistant> ") == 2
        cached = [int(n) for n in re.findall(r"prompt tokens: (\d+) cached", chat.stderr)]
        assert len(cached) == 2 and cached[1] > 0  # the second turn found the first in the cache
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphans left: {alive}"
    finally:
        if up.poll() is None:  # a failed assertion: take the children down too, or they outlive the test
            for child in psutil.Process(up.pid).children(recursive=True):
                child.kill()
            up.kill()
