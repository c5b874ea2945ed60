"""GPU launcher of the linear + cross-entropy: cuBLAS GEMMs through CuPy, the CUDA row kernels for
the statistics and gradients, ``fastxent._linear`` for the schedule.

On the GPU both schedules work on chunks of whole rows (``plan``): a GPU wants each GEMM and
each kernel launch large, and its memory, not a cache, is what bounds a chunk. The loss-only
pass reduces each chunk to row statistics with the class-range kernel (one GEMM's work); the
gradient pass turns each chunk into loss and gradient in place with the fused row kernel, then
runs dX = G W and dW += G^T X (cuBLAS with beta = 1) on it: three GEMMs' work, extra memory one
chunk + O(N).

Precision: float32 and float64 compute in their own type. float16 and bfloat16 compute in
float32 (cuBLAS float32 GEMMs on float32 copies of hidden and weight, dW accumulated in
float32), and the gradients are rounded to the input type once at the end, as on the CPU.

The host keeps the O(N) numbers (labels, sample weights, per-row losses): a chunk's labels go to
the device once per chunk and its losses come back once.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Tuple

import numpy

from fastxent import _linear
from fastxent._linear import Grads, LinearBlocks
from fastxent._options import KernelOptions
from fastxent._range import compute_dtype
from fastxent.gpu import partial, xent
from fastxent.gpu.xent import cupy

__all__ = ["CupyLinearOps", "linear_xent", "plan"]


class CupyLinearOps:
    """``fastxent._linear.LinearOps`` on CuPy arrays of one compute dtype (float32 or float64)."""

    def __init__(self, dtype: Any):
        self.dtype = numpy.dtype(dtype)

    def empty(self, shape: Tuple[int, ...]):
        return cupy.empty(shape, dtype=self.dtype)

    def logits(self, hidden, weight, bias, out):
        cupy.matmul(hidden, weight.T, out=out)
        if bias is not None:
            out += bias
        return out

    def hidden_grad(self, grad, weight, out) -> None:
        cupy.matmul(grad, weight, out=out)

    def accumulate_weight_grad(self, grad, hidden, out) -> None:
        # cuBLAS adds into dW in place (beta = 1): no (V, H) temporary.
        cupy.cublas.gemm("T", "N", grad, hidden, out=out, alpha=1.0, beta=1.0)

    def accumulate_bias_grad(self, grad, out) -> None:
        out += grad.sum(axis=0, dtype=numpy.float64)

    def worker_scope(self) -> ContextManager[None]:
        return contextlib.nullcontext()


def plan(blocks: LinearBlocks, num_classes: int) -> LinearBlocks:
    """The GPU's blocks from the budgeted ones: chunks of whole rows for both passes, one worker."""
    return LinearBlocks(rows=blocks.grad_rows, classes=num_classes, grad_rows=blocks.grad_rows, workers=1)


def _fused_rows(rows, labels, sample_weight, options: KernelOptions, **kwargs):
    """The fused row kernel on a chunk, with host labels and weights in and host losses out (the
    schedule keeps the O(N) numbers on the host)."""
    loss, grad, row_min = xent.fused_xent(rows, cupy.asarray(labels), cupy.asarray(sample_weight), options, **kwargs)
    return cupy.asnumpy(loss), grad, row_min


def _compute_copy(array, dtype):
    return None if array is None else cupy.ascontiguousarray(array, dtype=dtype)


def linear_xent(
    hidden,
    weight,
    bias,
    labels: numpy.ndarray,
    sample_weight: numpy.ndarray,
    options: KernelOptions,
    blocks: LinearBlocks,
    *,
    want_hidden: bool = False,
    want_weight: bool = False,
    want_bias: bool = False,
) -> Tuple[numpy.ndarray, Optional[Any], Optional[Any], Optional[Any]]:
    """Per-row loss and the wanted gradients of ``hidden @ weight.T + bias``'s cross-entropy, on
    the GPU of ``hidden``.

    Args:
        hidden: (N, H) CuPy float16/bfloat16/float32/float64.
        weight: (V, H) CuPy, the hidden's dtype and device.
        bias: (V,) CuPy of that dtype, or None.
        labels: int64 (N,) NumPy, in [0, V), -1 for ignored rows.
        sample_weight: float64 (N,) NumPy.
        options: validated options (``grad_scale``: the reduction's factor; ``class_weight``
            a NumPy (V,) array or None).
        blocks: the budgeted block shapes (``fastxent._linear.plan_blocks``); see ``plan``.
        want_hidden, want_weight, want_bias: which gradients to compute.

    Returns:
        (loss float64 (N,) NumPy, d hidden (N, H), d weight (V, H), d bias (V,)): gradients as
        CuPy arrays in the input dtype on the hidden's device, or None where not wanted.
    """
    dtype = hidden.dtype
    compute = compute_dtype(dtype)
    with hidden.device:
        ops = CupyLinearOps(compute)
        blocks = plan(blocks, weight.shape[0])
        hidden_c, weight_c, bias_c = (_compute_copy(a, compute) for a in (hidden, weight, bias))
        if not (want_hidden or want_weight or want_bias):
            loss = _linear.loss_rows(
                ops, partial.CupyKernel(), hidden_c, weight_c, bias_c, labels, sample_weight, options, blocks
            )
            return loss, None, None, None
        grads = Grads(
            cupy.empty(hidden_c.shape, dtype=compute) if want_hidden else None,
            cupy.zeros(weight_c.shape, dtype=compute) if want_weight else None,
            cupy.zeros(weight.shape[0], dtype=numpy.float64) if want_bias else None,
        )
        loss = _linear.loss_and_grads(
            ops, _fused_rows, hidden_c, weight_c, bias_c, labels, sample_weight, options, blocks, grads
        )
        hidden_grad, weight_grad, bias_grad = (None if g is None else g.astype(dtype, copy=False) for g in grads)
        return loss, hidden_grad, weight_grad, bias_grad
