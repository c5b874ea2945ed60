"""GPU launcher of the linear + cross-entropy: cuBLAS GEMMs through CuPy, the CUDA row kernels for
the loss and gradients, ``fastxent._linear`` for the schedule.

On the GPU both schedules work on chunks of whole rows (``plan``): a GPU wants each GEMM and
each kernel launch large, and its memory, not a cache, is what bounds a chunk. Each chunk is one
GEMM into float32 (float64) logits, then the fused row kernel: the loss alone (one GEMM's work
in all), or loss and gradient in place, followed by dX = G W and dW += G^T X (cuBLAS with
beta = 1): three GEMMs' work, extra memory one chunk + O(N).

Precision: float32 and float64 compute in their own type. float16 and bfloat16 hidden states
and weights go to cuBLAS as they are (``cublasGemmEx``: half-precision operands, float32
accumulation and output, tensor cores): the logits are float32, the row kernel works in float32,
and the chunk's gradient is rounded once to the input type for the two backward GEMMs, whose
outputs (dX, and dW accumulated over the chunks) are float32 and rounded to the input type once
at the end. No float32 copy of the weight or the hidden states is made.

Everything per row stays on the device: labels and sample weights go over once per call, the
per-row losses are written on the device, and nothing is read back, so a call makes no
device-to-host transfer of its own whatever the number of chunks.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace
from typing import Any, ContextManager, Optional, Tuple

import numpy

from fastxent import _linear
from fastxent._linear import Grads, LinearBlocks
from fastxent._options import KernelOptions
from fastxent._range import compute_dtype
from fastxent.gpu import xent
from fastxent.gpu.xent import cupy

__all__ = ["BUDGET_ENV", "DEFAULT_BUDGET", "CupyLinearOps", "linear_xent", "plan"]

# The chunk's default budget: this many bytes, and at most FREE_FRACTION of the device's free
# memory. A chunk's rows each take the whole vocabulary's logits (and, for half-precision
# inputs, its gradient rounded for the backward GEMMs): at V = 128256 in float32 4 GiB holds
# about 5600 rows, so most batches are one or two chunks, each streaming W twice and dW once.
DEFAULT_BUDGET = 4 << 30
FREE_FRACTION = 0.5
# Environment override of the default (bytes); an explicit ``memory_budget`` wins over it.
BUDGET_ENV = "FASTXENT_GPU_LINEAR_BUDGET"

# cuBLAS / CUDA enumerations of cublasGemmEx (cublas_api.h, library_types.h).
_OP_N, _OP_T = 0, 1
_CUDA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}
_COMPUTE_32F = 68  # CUBLAS_COMPUTE_32F: float32 accumulation
_GEMM_DEFAULT = -1  # CUBLAS_GEMM_DEFAULT (tensor cores where the types allow)
_HALF = ("float16", "bfloat16")


def _cublas():
    """CuPy's thin cuBLAS binding (``cupy.cuda.cublas`` in every release that has gemmEx)."""
    module = getattr(cupy.cuda, "cublas", None)
    if module is None:  # pragma: no cover - depends on the CuPy release
        from cupy_backends.cuda.libs import cublas as module
    return module


def _lead(matrix) -> int:
    """The leading dimension (elements between rows) of a row-major matrix with unit column
    stride, as cuBLAS sees its column-major transpose."""
    rows, cols = matrix.shape
    if cols > 1 and matrix.strides[1] != matrix.itemsize:
        raise ValueError(f"cuBLAS needs unit column strides; got strides {matrix.strides}")
    return max(1, cols, matrix.strides[0] // matrix.itemsize if rows > 1 else cols)


def gemm_ex(a, trans_a: bool, b, trans_b: bool, out, *, alpha: float = 1.0, beta: float = 0.0) -> None:
    """out (m, n) float32 = alpha op(a) @ op(b) + beta out, row-major, with cublasGemmEx: a and b
    float16 or bfloat16 (one type), float32 accumulation (tensor cores).

    ``op(x)`` is x.T where ``trans_x``. Every matrix has unit column stride; its rows may be
    further apart (a column slice of a wider buffer).
    """
    # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B's buffer goes first.
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if a.dtype != b.dtype or a.dtype.name not in _HALF or out.dtype != numpy.float32:
        raise TypeError(
            f"gemm_ex takes two float16/bfloat16 operands of one type and a float32 output; got {a.dtype}, {b.dtype} -> {out.dtype}"
        )
    operand = _CUDA_TYPES[a.dtype.name]
    alpha_host = numpy.array(alpha, dtype=numpy.float32)
    beta_host = numpy.array(beta, dtype=numpy.float32)
    cublas = _cublas()
    cublas.gemmEx(
        cupy.cuda.device.get_cublas_handle(),
        _OP_T if trans_b else _OP_N,
        _OP_T if trans_a else _OP_N,
        n,
        m,
        k,
        alpha_host.ctypes.data,
        b.data.ptr,
        operand,
        _lead(b),
        a.data.ptr,
        operand,
        _lead(a),
        beta_host.ctypes.data,
        out.data.ptr,
        _CUDA_TYPES["float32"],
        _lead(out),
        _COMPUTE_32F,
        _GEMM_DEFAULT,
    )


class CupyLinearOps:
    """``fastxent._linear.LinearOps`` on CuPy arrays: float32 or float64 buffers (``dtype``),
    and GEMM operands (hidden states, weight) in that type or, for float32 buffers, in float16
    or bfloat16, which go to cuBLAS's mixed-precision GEMM as they are.

    The backward GEMMs of half-precision operands take the chunk's gradient rounded to the
    operands' type: ``hidden_grad`` and ``accumulate_weight_grad`` of one chunk share that copy
    (the schedule passes them the same, unchanged gradient object, one after the other). The
    copy holds the gradient times the power of two nearest 1 / ``grad_scale`` (the reduction's
    factor), which the GEMMs' alpha takes back exactly: the rounded values are each row's own
    gradient, O(1), rather than O(1 / N), which in float16 would fall into the subnormals or
    flush to zero for long batches.
    """

    def __init__(self, dtype: Any, grad_scale: float = 1.0):
        self.dtype = numpy.dtype(dtype)
        scale = 1.0 if not (0.0 < grad_scale < float("inf")) else 2.0 ** -round(math.log2(grad_scale))
        self._unscale = 1.0 / scale
        self._scale = scale
        self._rounded: Optional[Tuple[Any, Any]] = None  # (gradient, its scaled half-precision copy)

    def empty(self, shape: Tuple[int, ...]):
        return cupy.empty(shape, dtype=self.dtype)

    def row_losses(self, num_rows: int):
        return cupy.zeros(num_rows, dtype=cupy.float64)

    def _operand_grad(self, grad, dtype):
        """The gradient in the GEMM operands' type (itself when it already is)."""
        if grad.dtype == dtype:
            return grad
        if self._rounded is None or self._rounded[0] is not grad or self._rounded[1].dtype != dtype:
            scaled = grad * self.dtype.type(self._scale) if self._scale != 1.0 else grad
            self._rounded = (grad, scaled.astype(dtype))
        return self._rounded[1]

    def logits(self, hidden, weight, bias, out):
        if hidden.dtype.name in _HALF:
            gemm_ex(hidden, False, weight, True, out)
        else:
            cupy.matmul(hidden, weight.T, out=out)
        if bias is not None:
            out += bias
        return out

    def hidden_grad(self, grad, weight, out) -> None:
        if weight.dtype.name in _HALF:
            gemm_ex(self._operand_grad(grad, weight.dtype), False, weight, False, out, alpha=self._unscale)
        else:
            cupy.matmul(grad, weight, out=out)

    def accumulate_weight_grad(self, grad, hidden, out) -> None:
        # cuBLAS adds into dW in place (beta = 1): no (V, H) temporary.
        if hidden.dtype.name in _HALF:
            gemm_ex(self._operand_grad(grad, hidden.dtype), True, hidden, False, out, alpha=self._unscale, beta=1.0)
            self._rounded = None  # the chunk's last use of it
        else:
            cupy.cublas.gemm("T", "N", grad, hidden, out=out, alpha=1.0, beta=1.0)

    def accumulate_bias_grad(self, grad, out) -> None:
        out += grad.sum(axis=0, dtype=numpy.float64)

    def worker_scope(self) -> ContextManager[None]:
        return contextlib.nullcontext()


def default_budget(device_id: Optional[int] = None) -> int:
    """The chunk budget in bytes when the call gives none: ``FASTXENT_GPU_LINEAR_BUDGET`` if set,
    else the smaller of ``DEFAULT_BUDGET`` and ``FREE_FRACTION`` of the device's free memory."""
    value = os.environ.get(BUDGET_ENV)
    if value:
        try:
            budget = int(value)
        except ValueError:
            budget = 0
        if budget < 1:
            raise ValueError(f"{BUDGET_ENV} must be a positive number of bytes; got {value!r}")
        return budget
    with cupy.cuda.Device(device_id):
        free, _total = cupy.cuda.runtime.memGetInfo()
    return max(1, min(DEFAULT_BUDGET, int(free * FREE_FRACTION)))


def plan(
    num_rows: int,
    num_classes: int,
    dtype: Any,
    *,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    want_grads: bool = True,
    device_id: Optional[int] = None,
) -> LinearBlocks:
    """The GPU's chunks: whole rows for both schedules, one worker, as many rows as the budget
    holds (``memory_budget`` bytes, else ``default_budget``), or ``block_rows``.

    A chunk row takes the vocabulary's logits in the compute type, and with gradients of
    half-precision inputs also their copy in the input type (the backward GEMMs' operand).
    """
    num_rows, num_classes = max(1, num_rows), max(1, num_classes)
    if block_rows is None:
        budget = default_budget(device_id) if memory_budget is None else memory_budget
        name = numpy.dtype(dtype).name
        row_bytes = num_classes * (compute_dtype(dtype).itemsize + (2 if want_grads and name in _HALF else 0))
        block_rows = max(1, budget // row_bytes)
        if block_rows >= _linear.ROW_ALIGN:  # whole GEMM tiles of rows
            block_rows -= block_rows % _linear.ROW_ALIGN
    rows = min(block_rows, num_rows)
    return LinearBlocks(rows=rows, classes=num_classes, grad_rows=rows, workers=1)


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
) -> Tuple[Any, Optional[Any], Optional[Any], Optional[Any]]:
    """Per-row loss and the wanted gradients of ``hidden @ weight.T + bias``'s cross-entropy, on
    the GPU of ``hidden``.

    Args:
        hidden: (N, H) CuPy float16/bfloat16/float32/float64.
        weight: (V, H) CuPy, the hidden's dtype and device.
        bias: (V,) CuPy of that dtype, or None.
        labels: int64 (N,) NumPy (or CuPy), in [0, V), -1 for ignored rows.
        sample_weight: float64 (N,) NumPy (or CuPy).
        options: validated options (``grad_scale``: the reduction's factor; ``class_weight``
            a (V,) array or None).
        blocks: the chunks (``plan``; ``blocks.grad_rows`` rows each).
        want_hidden, want_weight, want_bias: which gradients to compute.

    Returns:
        (loss float64 (N,), d hidden (N, H), d weight (V, H), d bias (V,)), all CuPy arrays on
        the hidden's device: the gradients in the input dtype, None where not wanted.
    """
    dtype = hidden.dtype
    compute = compute_dtype(dtype)
    # Half precision keeps its operands; float32/float64 are their own compute type.
    operand = dtype if dtype.name in _HALF else compute
    with hidden.device:
        ops = CupyLinearOps(compute, options.grad_scale)
        hidden_c, weight_c = (cupy.ascontiguousarray(a, dtype=operand) for a in (hidden, weight))
        bias_c = None if bias is None else cupy.ascontiguousarray(bias, dtype=compute)  # O(V)
        # The O(N) and O(V) numbers go over once, not once per chunk.
        labels = xent.contiguous(cupy.asarray(labels), numpy.int64)
        sample_weight = xent.contiguous(cupy.asarray(sample_weight), numpy.float64)
        if options.class_weight is not None:
            options = replace(options, class_weight=cupy.asarray(options.class_weight))
        num_rows, num_classes = hidden.shape[0], weight.shape[0]
        grads = Grads(
            cupy.empty((num_rows, hidden.shape[1]), dtype=compute) if want_hidden else None,
            cupy.zeros((num_classes, weight.shape[1]), dtype=compute) if want_weight else None,
            cupy.zeros(num_classes, dtype=numpy.float64) if want_bias else None,
        )
        loss = _linear.loss_and_grads(
            ops, xent.fused_xent, hidden_c, weight_c, bias_c, labels, sample_weight, options, blocks, grads
        )
        hidden_grad, weight_grad, bias_grad = (None if g is None else g.astype(dtype, copy=False) for g in grads)
        return loss, hidden_grad, weight_grad, bias_grad


# ----------------------------------------------------------------------------------------
# Per-token statistics of the logits hidden @ weight.T + bias
# ----------------------------------------------------------------------------------------


def _token_operands(hidden, weight, bias):
    """(ops, hidden, weight, bias) for the token-statistics chunks: half precision keeps its
    GEMM operands (float32 logits), float32 and float64 are their own compute type."""
    compute = compute_dtype(hidden.dtype)
    operand = hidden.dtype if hidden.dtype.name in _HALF else compute
    ops = CupyLinearOps(compute)
    hidden_c, weight_c = (cupy.ascontiguousarray(a, dtype=operand) for a in (hidden, weight))
    bias_c = None if bias is None else cupy.ascontiguousarray(bias, dtype=compute)
    return ops, hidden_c, weight_c, bias_c


def linear_token_row_stats(hidden, weight, bias, labels, blocks: LinearBlocks, temperature: float, softcap):
    """``fastxent._token_range.TokenRowStats`` ((N,) CuPy arrays) of the logits
    ``hidden @ weight.T + bias``, one chunk of ``blocks.rows`` whole rows at a time (a GEMM into
    one buffer, then the statistics kernel): no host reads.

    hidden (N, H), weight (V, H), bias (V,) or None, CuPy of one floating dtype on one device;
    labels int64 (N,) in [0, V), -1 for ignored rows.
    """
    from fastxent._token_range import TokenRowStats
    from fastxent.gpu import stats

    with hidden.device:
        ops, hidden_c, weight_c, bias_c = _token_operands(hidden, weight, bias)
        labels = xent.contiguous(cupy.asarray(labels), numpy.int64)
        num_rows, num_classes = hidden.shape[0], weight.shape[0]
        fields = cupy.empty((5, num_rows), dtype=cupy.float64)
        argmax = cupy.zeros(num_rows, dtype=cupy.int64)
        step = max(1, blocks.rows)
        buffer = ops.empty((min(step, max(num_rows, 1)), num_classes))
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            chunk = ops.logits(hidden_c[lo:hi], weight_c, bias_c, buffer[: hi - lo])
            part = stats.token_row_stats(chunk, labels[lo:hi], temperature, softcap)
            for k in range(5):
                fields[k, lo:hi] = part[k]
            argmax[lo:hi] = part.argmax
        return TokenRowStats(*fields, argmax)


def linear_token_grads(
    hidden,
    weight,
    bias,
    labels,
    row_stats,
    grad_logprob,
    grad_entropy,
    grad_lse,
    blocks: LinearBlocks,
    temperature: float,
    softcap,
    *,
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
):
    """Gradients w.r.t. hidden, weight and bias of sum(a logprob + b entropy + c lse) of the
    logits ``hidden @ weight.T + bias``, on the device (``fastxent.cpu.linear.linear_token_grads``
    is the CPU's): each chunk's logits computed again, turned into their gradient in place by
    ``xent_token_grad_*`` and taken back through the layer by the GEMMs. Labels int64 (N,): -1
    ignored, -2 a row without a target term; the upstream gradients float64 (N,)."""
    from fastxent.gpu import stats

    dtype = hidden.dtype
    with hidden.device:
        ops, hidden_c, weight_c, bias_c = _token_operands(hidden, weight, bias)
        compute = ops.dtype
        labels = xent.contiguous(cupy.asarray(labels), numpy.int64)
        # The per-row numbers the kernel needs, sliced with the rows by the schedule.
        row_data = cupy.stack(
            [cupy.asarray(v, dtype=cupy.float64) for v in (*row_stats[:3], grad_logprob, grad_entropy, grad_lse)],
            axis=1,
        )

        def chunk_grad(rows, rows_labels, values, _options, *, want_grad, inplace):
            chunk_stats = (values[:, 0], values[:, 1], values[:, 2])
            stats.token_grad(
                rows, rows_labels, chunk_stats, values[:, 3], values[:, 4], values[:, 5], temperature, softcap,
                inplace=True,
            )  # fmt: skip
            return cupy.zeros(rows.shape[0]), rows, None

        grads = Grads(
            cupy.empty((hidden.shape[0], hidden.shape[1]), dtype=compute) if want_hidden else None,
            cupy.zeros(weight_c.shape, dtype=compute) if want_weight else None,
            cupy.zeros(weight.shape[0], dtype=numpy.float64) if want_bias else None,
        )
        _linear.loss_and_grads(ops, chunk_grad, hidden_c, weight_c, bias_c, labels, row_data, None, blocks, grads)
        return tuple(None if g is None else g.astype(dtype, copy=False) for g in grads)
