"""The README's performance table is what bench/results/*.json say (scripts/perf_table.py --check),
and the check fails as soon as one recorded figure changes. Files only: no model, no cluster."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "perf_table.py"


def perf_table(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_readme_table_matches_the_recorded_results():
    run = perf_table("--check")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr


def test_a_changed_figure_fails_the_check_until_the_table_is_regenerated(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results, ignore=shutil.ignore_patterns("*.png", "tmp"))
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    paths = ("--readme", str(readme), "--results-dir", str(results))
    assert perf_table("--check", *paths).returncode == 0

    ttft = json.loads((results / "ttft.json").read_text())
    ttft["ratios"]["ttft_cold_over_warm"].update(value=12.5, met=False)
    (results / "ttft.json").write_text(json.dumps(ttft))
    stale = perf_table("--check", *paths)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    recorded = next(line for line in readme.read_text().splitlines() if line.startswith("| ttft | TTFT cold ÷ warm"))
    assert f"-{recorded}" in stale.stdout and "12.5×" in stale.stdout  # the diff shows the old row and the new figure
    assert readme.read_text() == (REPO / "README.md").read_text()  # --check writes nothing

    assert perf_table(*paths).returncode == 0
    assert perf_table("--check", *paths).returncode == 0
    table = readme.read_text().split("<!-- perf-table:begin -->")[1].split("<!-- perf-table:end -->")[0]
    row = next(line for line in table.splitlines() if line.startswith("| ttft | TTFT cold ÷ warm"))
    assert "| 12.5× | ≥ 25× | **no** |" in row
    outside = readme.read_text().replace(table, "")
    assert outside == (REPO / "README.md").read_text().replace(
        (REPO / "README.md").read_text().split("<!-- perf-table:begin -->")[1].split("<!-- perf-table:end -->")[0], "")


def test_a_readme_without_the_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    run = perf_table("--check", "--readme", str(readme))
    assert run.returncode != 0 and "perf-table:begin" in run.stderr
