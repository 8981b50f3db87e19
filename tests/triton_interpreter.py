"""Triton's interpreter, with tl.dot computed the way Triton's CUDA backend computes the kernels' dots.

The kernels (kvcluster/model/triton_kernels/) only ever dot fp32 operands with input_precision="ieee",
which the CUDA backend lowers to FMA instructions: per output element one fused multiply-add per k,
in order, starting from the accumulator (FMADotUtility's multiplyVectors: `accum = fma(a_k, b_k,
accum)`). The interpreter instead calls np.matmul, i.e. OpenBLAS, whose result for a row depends on
where that row sits in the tile (its micro-kernels block rows by 6 or 16 and treat the rest
differently: measured here), so it could never show a kernel to be batch-invariant. This replaces
that one numpy call with the FMA chain; everything else the interpreter does is untouched, and any
other dot (none in our kernels) still goes to np.matmul.

numpy has no fused multiply-add, so `fma_fp32` builds a correctly rounded one: the fp32 product is
exact in fp64, their sum is rounded to odd in fp64 (TwoSum gives its exact error), and rounding that
to fp32 is then correct (53 >= 24 + 2 bits; Boldo and Melquiond's round-to-odd).
"""

import numpy as np


def fma_fp32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to float32 (finite inputs), elementwise with broadcasting."""
    product = a.astype(np.float64) * b.astype(np.float64)           # exact: 24 + 24 bits
    addend = c.astype(np.float64)
    total = product + addend
    back = total - addend
    error = (product - back) + (addend - (total - back))             # TwoSum: total + error is exact
    even = (total.view(np.int64) & 1) == 0
    toward = np.where(error > 0, np.inf, -np.inf)
    total = np.where((error != 0) & even, np.nextafter(total, toward), total)  # round to odd
    return total.astype(np.float32)


def dot_in_fma_order() -> None:
    """Patch the interpreter's tl.dot (idempotent; only under TRITON_INTERPRET=1)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "fma_order", False):
        return
    numpy_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (a.data.ndim == 2 and a.data.dtype == b.data.dtype == d.data.dtype == np.float32):
            return numpy_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = np.broadcast_to(d.data, (a.data.shape[0], b.data.shape[1]))
        for k in range(a.data.shape[1]):
            acc = fma_fp32(a.data[:, k:k + 1], b.data[k:k + 1, :], acc)
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    create_dot.fma_order = True
    builder.create_dot = create_dot
