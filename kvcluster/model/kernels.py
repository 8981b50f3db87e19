"""Compiled CPU kernels of the engine (C++ through torch.utils.cpp_extension), built once per machine:
the paged-attention op, the few-rows matmul, the batch-invariant matmul and RMSNorm (csrc/, one
extension).

`make install` builds them (`python -m kvcluster.model.kernels`); otherwise the first engine that
wants them builds them (gcc, ~1 minute). The build folder is keyed by the source, the torch version
and the CPU's flags (the code is compiled for this CPU, -march=native), so a copy of the repo on
another machine rebuilds instead of running instructions its CPU lacks. When the build fails (no
compiler, read-only folder) or KVC_KERNELS=0, every `*_op()` is None and the model runs its
plain-torch path: same math, more copies and slower matmuls.
"""

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))  # part of the build key: vec.h holds kernels too
DEFAULT_BUILD_ROOT = Path(__file__).resolve().parents[2] / "build" / "kernels"
EXTENSION = "kvcluster_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def build_dir() -> Path:
    code = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(code + Path(__file__).read_bytes() + torch.__version__.encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    return Path(os.environ.get("KVC_KERNEL_DIR", DEFAULT_BUILD_ROOT)) / key


@functools.cache
def _load() -> bool:
    if os.environ.get("KVC_KERNELS", "1") == "0":
        return False
    try:
        folder = build_dir()
        built = folder / f"{EXTENSION}.so"
        if built.exists():
            # Built before (a container image's builder stage): no compiler, ninja, setuptools or
            # writable folder needed.
            torch.ops.load_library(str(built))
            return True
        from torch.utils import cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(EXTENSION, [str(source) for source in SOURCES], build_directory=str(folder), is_python_module=False,
                           # -fopenmp: at::parallel_for is a header template that runs serially unless
                           # the extension itself is built with OpenMP; the loader then reuses torch's
                           # own libgomp.so.1 (same soname), so there is one thread pool.
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           verbose=False)
        return True
    except Exception as exc:  # no compiler, no headers, read-only folder: the torch path still works
        log.warning("compiled kernels unavailable, using the plain torch attention path: %s", exc)
        return False


def kernel_isa() -> str:
    """Which arithmetic the compiled kernels run here, part of a block's fingerprint under batch-invariant
    numerics: they are built for this CPU (-march=native), and their AVX-512, AVX2 and portable paths
    sum in different orders (csrc/vec.h: 16-lane trees, 8-lane trees, sequential loops; the
    matmul's per-element chains are the same on all three), as the bf16 matmul differs with and without
    AVX512-BF16 on denormals. Workers on CPUs of different kinds then never share blocks whose
    bytes would differ."""
    flags = set(_cpu_flags().split())
    if "avx512f" not in flags:
        return "avx2" if {"avx2", "fma"} <= flags else "portable"
    return "avx512-bf16" if "avx512_bf16" in flags else "avx512"


def paged_attention_op():
    """torch.ops.kvcluster.paged_attention (see csrc/paged_attention.cpp), or None when unavailable."""
    return torch.ops.kvcluster.paged_attention if _load() else None


def rms_norm_op():
    """torch.ops.kvcluster.rms_norm (see csrc/rms_norm.cpp), or None when unavailable."""
    return torch.ops.kvcluster.rms_norm if _load() else None


def few_rows_linear_op():
    """torch.ops.kvcluster.few_rows_linear (see csrc/few_rows_linear.cpp), or None when unavailable."""
    return torch.ops.kvcluster.few_rows_linear if _load() else None


def invariant_linear_op():
    """torch.ops.kvcluster.invariant_linear (see csrc/invariant_linear.cpp), or None when unavailable."""
    return torch.ops.kvcluster.invariant_linear if _load() else None


def invariant_pack_op():
    """torch.ops.kvcluster.invariant_pack, the weight layout invariant_linear reads, or None."""
    return torch.ops.kvcluster.invariant_pack if _load() else None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ok = paged_attention_op() is not None
    print(f"kvcluster kernels: {'built in ' + str(build_dir()) if ok else 'unavailable (torch fallback)'}")
    sys.exit(0)
