"""What every benchmark records: the machine, the software, the commit; and how results are written."""

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "commit": git_commit(),
        # Other work on the machine skews every figure (2 busy cores slow torch's 2 threads several-fold).
        "loadavg_1m": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls (one warm-up call first)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_result(name: str, payload: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"name": name, "machine": machine_info(), **payload}, indent=2) + "\n")
    return path


# ---- what every suite measure shares: ratio entries, percentiles, progress lines -----------------

def at_least(value: float, target: float, digits: int = 2) -> dict:
    """A ratio entry (the shape every results JSON uses) whose target is a lower bound."""
    return {"value": round(value, digits), "target": f">= {target:g}", "met": bool(value >= target)}


def at_most(value: float, target: float, digits: int = 2) -> dict:
    return {"value": round(value, digits), "target": f"<= {target:g}", "met": bool(value <= target)}


def below(value: float, target: float, digits: int = 3) -> dict:
    return {"value": round(value, digits), "target": f"< {target:g}", "met": bool(value < target)}


def not_run(target: str, reason: str) -> dict:
    """A ratio entry for a measure skipped in this run (tiny mode, no GPU): value and met are null."""
    return {"value": None, "target": target, "met": None, "skipped": reason}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def progress(measure: str, message: str) -> None:
    """One line of progress, flushed at once so `make bench` shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {measure:<17} {message}", flush=True)
