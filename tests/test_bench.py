"""The benchmark suite runs end to end (`--tiny`: real model, real cluster, smallest sizes) and every
measure leaves a results JSON of the agreed shape and a valid PNG. No timing is asserted."""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the bench plots need matplotlib (the `bench` extras)")

from bench.suite import MEASURES  # noqa: E402  (after the skip: it imports matplotlib)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
MACHINE_FIELDS = ("cpu", "cores", "torch", "device", "commit")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    results = tmp_path_factory.mktemp("bench-results")
    run = subprocess.run([sys.executable, "-m", "bench.suite", "--tiny", "--results-dir", str(results)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    return results, run


def check_png(path: Path) -> None:
    """Signature, then an IHDR chunk with a correct CRC and a non-empty image."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29])
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{path.name} is truncated"


def check_ratio(name: str, entry: dict) -> None:
    assert {"value", "target", "met"} <= entry.keys(), f"{name}: {entry}"
    assert isinstance(entry["target"], str) and entry["target"][:1] in "<>", f"{name}: target {entry['target']!r}"
    if entry["met"] is None:  # not run this time: it must say why
        assert entry["value"] is None and entry.get("skipped"), f"{name}: {entry}"
    else:
        assert isinstance(entry["met"], bool) and isinstance(entry["value"], (int, float)), f"{name}: {entry}"


@pytest.mark.slow  # runs the whole suite (--tiny): minutes
def test_tiny_suite_exits_cleanly(tiny_run):
    _, run = tiny_run
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "| measure | ratio | value | target | met |" in run.stdout  # the summary table is printed


@pytest.mark.slow  # runs the whole suite (--tiny): minutes
@pytest.mark.parametrize("name", list(MEASURES))
def test_measure_writes_json_and_png(tiny_run, name):
    results, _ = tiny_run
    payload = json.loads((results / f"{name}.json").read_text())
    assert payload["name"] == name and payload["mode"] == "tiny"
    for field in MACHINE_FIELDS:
        assert payload["machine"].get(field) not in (None, ""), f"machine.{field} missing"
    assert payload["ratios"], "every measure records at least one ratio"
    for ratio, entry in payload["ratios"].items():
        check_ratio(f"{name}.{ratio}", entry)
    check_png(results / f"{name}.png")


@pytest.mark.slow  # runs the whole suite (--tiny): minutes
def test_suite_summary_lists_every_ratio(tiny_run):
    results, _ = tiny_run
    summary = json.loads((results / "suite.json").read_text())
    assert summary["failed"] == [] and summary["measures"] == list(MEASURES)
    for name in MEASURES:
        ratios = json.loads((results / f"{name}.json").read_text())["ratios"]
        assert summary["all_ratios"][name] == ratios
    table = (results / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in MEASURES)


def test_unknown_measure_is_refused():
    run = subprocess.run([sys.executable, "-m", "bench.suite", "--only", "nope", "--results-dir", "/nonexistent"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown measure" in run.stderr


def test_aiperf_exports_of_recorded_runs_parse():
    """Summary exports of two real aiperf 0.13 runs: the tiny cache run against the bench cluster's
    gateway, and one against a stub server that answered every other chat request with 503."""
    from bench.aiperf_chat import parse_export

    recorded = {"requests": 4, "errors": 0, "duration_s": 0.956, "requests_per_s": 4.1679, "ttft_p50_ms": 207.7,
                "ttft_p99_ms": 322.8, "prompt_tokens": 518, "cached_tokens": 288, "cached_share": 0.556,
                "output_tokens": 8, "aiperf_version": "0.13.0", "cancelled": False}
    assert parse_export(DATA / "aiperf_export_cluster.json", expected_requests=4) == recorded
    half_failed = parse_export(DATA / "aiperf_export_half_failed.json", expected_requests=4)
    assert half_failed["requests"] == 2 and half_failed["errors"] == 2
    assert parse_export(DATA / "aiperf_export_half_failed.json", expected_requests=6)["errors"] == 4  # 2 never ran
