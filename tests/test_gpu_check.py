"""`make gpu-check` on a machine without a GPU: it stops at once with a clear message and exit status
2, before installing or starting anything (on a GPU machine it is the check itself: docs/gpu.md)."""

import subprocess
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine `make gpu-check` is the real check")


@no_gpu
def test_the_script_refuses_a_machine_without_a_gpu():
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})  # no nvidia-smi on this PATH, even where one exists
    assert done.returncode == 2, done.stderr
    assert "no NVIDIA GPU on this machine" in done.stderr and "nothing was checked" in done.stderr
    assert "make install" not in done.stdout  # stopped before installing anything

