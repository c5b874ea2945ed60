"""CPU launcher of the linear + cross-entropy: NumPy's BLAS for the GEMMs, the Numba row kernels
for the statistics and gradients, ``fastxent._linear`` for the schedule.

Precision: float32 and float64 inputs compute in their own dtype (BLAS sgemm/dgemm, the kernels
in that type, dW accumulated in it). float16 and bfloat16 have no BLAS GEMM in NumPy (its
half-precision matmul is a slow scalar loop), so they compute in float32: hidden and weight
are converted once (a float32 copy of each, 2x their size), dW accumulates in a float32
buffer, and the gradients are rounded to the input dtype once at the end. The extra memory for
half precision is therefore the float32 copies of hidden and weight and the float32 dW, on
top of the chunk of logits.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional, Tuple

import numba
import numpy as np

from fastxent import _linear
from fastxent._linear import Grads, LinearBlocks
from fastxent._options import KernelOptions
from fastxent._range import compute_dtype, local_labels
from fastxent._token_range import TokenRowStats, merge_token_stats, shift_argmax
from fastxent.cpu import blas, stats, xent

__all__ = [
    "KERNEL_THREADS",
    "NumpyLinearOps",
    "linear_token_grads",
    "linear_token_row_stats",
    "linear_xent",
    "max_workers",
]

# Threads of the Numba row kernels between the GEMMs (None: Numba's setting). OpenBLAS's
# workers keep spinning for a while after each GEMM; a parallel kernel run in that window
# competes with them for the cores, and the GEMM after it with the kernel's idle workers.
# The kernels are a few per cent of the work, so they run on the calling thread alone.
KERNEL_THREADS: Optional[int] = 1


@contextlib.contextmanager
def kernel_threads(count: Optional[int]) -> Iterator[None]:
    """Numba's thread count for this thread (its setting is thread-local) within the block."""
    if count is None:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(min(count, previous))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


class NumpyLinearOps:
    """``fastxent._linear.LinearOps`` on NumPy arrays of one compute dtype (float32 or float64)."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)

    def empty(self, shape: Tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, dtype=self.dtype)

    def row_losses(self, num_rows: int) -> np.ndarray:
        return np.zeros(num_rows)

    def logits(self, hidden: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray) -> np.ndarray:
        np.matmul(hidden, weight.T, out=out)
        if bias is not None:
            out += bias
        return out

    def hidden_grad(self, grad: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        np.matmul(grad, weight, out=out)

    def accumulate_weight_grad(self, grad: np.ndarray, hidden: np.ndarray, out: np.ndarray) -> None:
        blas.accumulate_at_b(grad, hidden, out)

    def accumulate_bias_grad(self, grad: np.ndarray, out: np.ndarray) -> None:
        # A GEMV over the chunk's rows in the compute type; the chunks add up in float64.
        out += np.ones(grad.shape[0], dtype=grad.dtype) @ grad

    def worker_scope(self) -> ContextManager[None]:
        # Numba's thread count is per thread: each worker's kernels run on the worker itself.
        return kernel_threads(1)


def max_workers() -> int:
    """Worker threads for a large problem: as many as NumPy's BLAS would use for one GEMM."""
    return blas.num_threads() if blas.has_thread_control() else 1


def _threads(blocks: LinearBlocks) -> ContextManager[None]:
    """The calling thread's setup for a schedule: single-threaded GEMMs when workers share the
    work (each worker is one core's worth), else BLAS's own threads and kernels on this thread."""
    if blocks.workers > 1:
        return blas.single_threaded()
    return kernel_threads(KERNEL_THREADS)


def _compute_copy(array: Optional[np.ndarray], dtype: np.dtype) -> Optional[np.ndarray]:
    """C-contiguous ``array`` in the compute dtype (itself where it already is)."""
    return None if array is None else np.ascontiguousarray(array, dtype=dtype)


def linear_xent(
    hidden: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    blocks: LinearBlocks,
    *,
    want_hidden: bool = False,
    want_weight: bool = False,
    want_bias: bool = False,
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """Per-row loss and the wanted gradients of ``hidden @ weight.T + bias``'s cross-entropy.

    Args:
        hidden: (N, H) float16/bfloat16/float32/float64.
        weight: (V, H), the hidden's dtype.
        bias: (V,) of that dtype, or None.
        labels: int64 (N,) in [0, V), -1 for ignored rows.
        sample_weight: float64 (N,).
        options: validated options (``grad_scale``: the reduction's factor).
        blocks: the block shapes (``fastxent._linear.plan_blocks``).
        want_hidden, want_weight, want_bias: which gradients to compute (none: loss only,
            one GEMM's work).

    Returns:
        (loss float64 (N,), d hidden (N, H), d weight (V, H), d bias (V,)), each gradient in
        the input dtype or None where not wanted.
    """
    dtype = hidden.dtype
    compute = compute_dtype(dtype)
    ops = NumpyLinearOps(compute)
    hidden_c, weight_c, bias_c = (_compute_copy(a, compute) for a in (hidden, weight, bias))
    if not (want_hidden or want_weight or want_bias):
        with _threads(blocks):
            loss = _linear.loss_rows(
                ops, xent.NumpyKernel(), hidden_c, weight_c, bias_c, labels, sample_weight, options, blocks
            )
        return loss, None, None, None

    num_classes = weight.shape[0]
    grads = Grads(
        np.empty(hidden_c.shape, dtype=compute) if want_hidden else None,
        np.zeros(weight_c.shape, dtype=compute) if want_weight else None,
        np.zeros(num_classes) if want_bias else None,
    )
    with _threads(blocks):
        loss = _linear.loss_and_grads(
            ops, xent.fused_xent, hidden_c, weight_c, bias_c, labels, sample_weight, options, blocks, grads
        )
    hidden_grad, weight_grad, bias_grad = (None if g is None else g.astype(dtype, copy=False) for g in grads)
    return loss, hidden_grad, weight_grad, bias_grad


def linear_token_row_stats(
    hidden: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    labels: np.ndarray,
    blocks: LinearBlocks,
    temperature: float,
    softcap: Optional[float],
) -> TokenRowStats:
    """The per-token statistics (``fastxent._token_range.TokenRowStats``, (N,) each) of the
    logits ``hidden @ weight.T + bias`` from blocks of them (one GEMM's work).

    hidden (N, H), weight (V, H), bias (V,) or None of one floating dtype; labels int64 (N,) in
    [0, V), -1 for ignored rows.
    """
    compute = compute_dtype(hidden.dtype)
    ops = NumpyLinearOps(compute)
    hidden_c, weight_c, bias_c = (_compute_copy(a, compute) for a in (hidden, weight, bias))

    def range_stats(block: np.ndarray, row_lo: int, row_hi: int, lo: int, hi: int) -> TokenRowStats:
        block_labels = local_labels(labels[row_lo:row_hi], lo, hi - lo)
        return shift_argmax(stats.token_row_stats(block, block_labels, temperature, softcap), lo)

    with _threads(blocks):
        per_block = _linear.block_stats(ops, hidden_c, weight_c, bias_c, blocks, range_stats, merge_token_stats)
    if not per_block:
        return stats.token_row_stats(np.empty((0, 1), dtype=compute), labels, temperature, softcap)
    parts = [per_block[row_lo] for row_lo in sorted(per_block)]
    return TokenRowStats(*(np.concatenate(field) for field in zip(*parts, strict=True)))


def linear_token_grads(
    hidden: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    labels: np.ndarray,
    row_stats: TokenRowStats,
    grad_logprob: np.ndarray,
    grad_entropy: np.ndarray,
    grad_lse: np.ndarray,
    blocks: LinearBlocks,
    temperature: float,
    softcap: Optional[float],
    *,
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """Gradients w.r.t. hidden, weight and bias of sum(a logprob + b entropy + c lse) of the
    logits ``hidden @ weight.T + bias``: chunks of rows over the whole vocabulary, each chunk's
    logits computed again (the statistics ``row_stats`` came from the forward), turned into
    their gradient in place, and taken back through the layer (three GEMMs' work).

    labels int64 (N,): -1 ignored, -2 a row without a target term (see ``stats.token_grad``);
    the upstream gradients float64 (N,). Returns the wanted gradients in the input dtype.
    """
    dtype = hidden.dtype
    compute = compute_dtype(dtype)
    ops = NumpyLinearOps(compute)
    hidden_c, weight_c, bias_c = (_compute_copy(a, compute) for a in (hidden, weight, bias))
    # The per-row values the chunks' kernel needs, sliced with the rows by the schedule.
    row_data = np.stack(
        [row_stats.row_max, row_stats.sum_exp, row_stats.centred_sum, grad_logprob, grad_entropy, grad_lse], axis=1
    )

    def chunk_grad(rows, rows_labels, values, _options, *, want_grad, inplace):
        chunk_stats = TokenRowStats(values[:, 0], values[:, 1], values[:, 2], None, None, None)
        stats.token_grad(
            rows, rows_labels, chunk_stats, values[:, 3], values[:, 4], values[:, 5], temperature, softcap, inplace=True
        )
        return np.zeros(rows.shape[0]), rows, None

    grads = Grads(
        np.empty(hidden_c.shape, dtype=compute) if want_hidden else None,
        np.zeros(weight_c.shape, dtype=compute) if want_weight else None,
        np.zeros(weight.shape[0]) if want_bias else None,
    )
    with _threads(blocks):
        _linear.loss_and_grads(ops, chunk_grad, hidden_c, weight_c, bias_c, labels, row_data, None, blocks, grads)
    return tuple(None if g is None else g.astype(dtype, copy=False) for g in grads)
