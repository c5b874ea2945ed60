"""Linear + cross-entropy without the logits: the backend-neutral orchestration.

The logits of an LM head are ``hidden @ weight.T + bias``, (N, V); with N = 1e5 rows and
V = 2.6e5 classes they would take 100 GB in float32. This module never holds more than one
block of them. It belongs to no backend: a backend provides its GEMMs (``LinearOps``) and its
row kernels (the range layer's ``RangeKernel`` and its fused launcher), and everything here is
loops over blocks, the range layer's merge and epilogue, and O(N) host numbers.

Two schedules, chosen by whether gradients are wanted:

1. Loss only (``loss_rows``): blocks of (rows, classes) small enough to stay in cache. Each is
   one GEMM; the range kernel reads the block back while it is still cached and returns its
   partial statistics (row max, sum of exps, target logit, weighted sum), which merge exactly
   into the running statistics. One GEMM's work in all, extra memory one block + O(N).

2. With gradients (``loss_and_grads``): chunks of rows over the whole vocabulary, each
   computed once: logits of the chunk (one GEMM), the core's fused row kernel turns them into
   loss and gradient in place (each row's statistics and gradient while the row is in L2),
   then dX_chunk = G W (K = V) and dW += G^T X_chunk (BLAS accumulates in place; K = the chunk's
   rows). Three GEMMs' work, nothing recomputed; extra memory one chunk + O(N).

   Why not blocks of classes for the gradients: the gradient of a class block needs the
   log-sum-exp over the whole vocabulary first, so a pass over statistics and a second
   pass over recomputed logits would cost a fourth GEMM (4/3 of the minimum). Chunks of rows
   keep each row's whole vocabulary together instead; their one cost is the K of the dW GEMM,
   which stays at full speed from about 256 rows (measured with OpenBLAS), where it blocks K
   itself.

Block shapes come from the memory budget (``plan_blocks``) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Optional, Protocol, Tuple

import numpy as np

from fastxent._options import KernelOptions
from fastxent._range import (
    RangeKernel,
    finish_rows,
    local_labels,
    merge_stats,
    neutral_stats,
    target_weights,
)

# The loss-only pass: bytes of one block of logits, so it stays in the last-level cache
# between the GEMM that writes it and the kernel that reads it.
CACHE_BLOCK_BYTES = 8 << 20
# Rows of a block in the loss-only pass (and at most this many rows per GEMM there).
FORWARD_ROWS = 2048
# The gradient pass's chunk: at most this many bytes, and at most an eighth of the whole
# logits (the point of the fused op is to be far from storing them).
DEFAULT_MEMORY_BUDGET = 256 << 20
LOGITS_FRACTION = 8
# Row counts are rounded down to a multiple of this (GEMM micro-kernels work in such tiles).
ROW_ALIGN = 16
CLASS_ALIGN = 256


@dataclass(frozen=True)
class LinearBlocks:
    """Block shapes of one call.

    Attributes:
        rows: rows per block of the loss-only pass.
        classes: classes per block of the loss-only pass.
        grad_rows: rows per chunk of the gradient pass (each chunk spans the whole vocabulary).
    """

    rows: int
    classes: int
    grad_rows: int


def _round_down(value: int, align: int) -> int:
    return value - value % align if value >= align else max(1, value)


def plan_blocks(
    num_rows: int,
    num_classes: int,
    itemsize: int,
    *,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
) -> LinearBlocks:
    """Block shapes from the problem size and a memory budget (bytes of logits held at once).

    Without a budget: the smaller of ``DEFAULT_MEMORY_BUDGET`` and an eighth of the N x V
    logits. ``block_rows`` overrides the rows of both passes, ``block_classes`` the classes of
    the loss-only pass.
    """
    num_rows, num_classes = max(1, num_rows), max(1, num_classes)
    logits_bytes = num_rows * num_classes * itemsize
    if memory_budget is None:
        memory_budget = min(DEFAULT_MEMORY_BUDGET, logits_bytes // LOGITS_FRACTION)
    cache_bytes = min(CACHE_BLOCK_BYTES, max(memory_budget, 1))

    rows = min(num_rows, FORWARD_ROWS)
    classes = _round_down(cache_bytes // (rows * itemsize), CLASS_ALIGN)
    if classes < CLASS_ALIGN and num_classes >= CLASS_ALIGN:
        # A narrow budget: keep the class blocks GEMM-sized and give up rows instead.
        classes = CLASS_ALIGN
        rows = _round_down(max(1, cache_bytes // (classes * itemsize)), ROW_ALIGN)
    grad_rows = _round_down(max(1, memory_budget // (num_classes * itemsize)), ROW_ALIGN)

    if block_rows is not None:
        rows = grad_rows = block_rows
    if block_classes is not None:
        classes = block_classes
    return LinearBlocks(min(rows, num_rows), min(classes, num_classes), min(grad_rows, num_rows))


class LinearOps(Protocol):
    """The GEMMs a backend provides, on arrays of its own type in the compute dtype."""

    def empty(self, shape: Tuple[int, ...]) -> Any:
        """An uninitialised buffer in the compute dtype."""

    def logits(self, hidden: Any, weight: Any, bias: Optional[Any], out: Any) -> Any:
        """out (n, v) = hidden (n, H) @ weight (v, H)^T [+ bias (v,)]; returns out."""

    def hidden_grad(self, grad: Any, weight: Any, out: Any) -> None:
        """out (n, H) = grad (n, V) @ weight (V, H)."""

    def accumulate_weight_grad(self, grad: Any, hidden: Any, out: Any) -> None:
        """out (V, H) += grad (n, V)^T @ hidden (n, H)."""

    def accumulate_bias_grad(self, grad: Any, out: Any) -> None:
        """out (V,) float64 += the column sums of grad (n, V)."""


class Grads(NamedTuple):
    """Gradient buffers to fill (None where not wanted), in the compute dtype (bias: float64)."""

    hidden: Optional[Any]
    weight: Optional[Any]
    bias: Optional[Any]


FusedRows = Callable[..., Tuple[Any, Any, Any]]


def _block_view(buffer: Any, num_rows: int, num_classes: int) -> Any:
    """A C-contiguous (rows, classes) view of the front of a flat buffer (GEMMs and kernels
    both want contiguous rows, also for the last, narrower block)."""
    return buffer[: num_rows * num_classes].reshape(num_rows, num_classes)


def loss_rows(
    ops: LinearOps,
    kernel: RangeKernel,
    hidden: Any,
    weight: Any,
    bias: Optional[Any],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    blocks: LinearBlocks,
) -> np.ndarray:
    """Per-row losses float64 (N,) from class-block statistics (schedule 1 of the module docstring).

    hidden (N, H), weight (V, H), bias (V,) or None in the compute dtype; labels int64 (N,)
    over the whole vocabulary, -1 for ignored rows; sample_weight float64 (N,).
    """
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    loss = np.zeros(num_rows)
    if num_rows == 0:
        return loss
    buffer = ops.empty((blocks.rows * blocks.classes,))
    class_weight = options.class_weight
    for row_lo in range(0, num_rows, blocks.rows):
        row_hi = min(row_lo + blocks.rows, num_rows)
        rows_labels = labels[row_lo:row_hi]
        stats = neutral_stats(row_hi - row_lo)
        for lo in range(0, num_classes, blocks.classes):
            hi = min(lo + blocks.classes, num_classes)
            # 1. One block of logits, written by the GEMM ...
            block = ops.logits(
                hidden[row_lo:row_hi],
                weight[lo:hi],
                None if bias is None else bias[lo:hi],
                _block_view(buffer, row_hi - row_lo, hi - lo),
            )
            # 2. ... read back by the range kernel while it is cached, merged into the rows' statistics.
            block_options = options if class_weight is None else replace(options, class_weight=class_weight[lo:hi])
            part = kernel.stats(block, local_labels(rows_labels, lo, hi - lo), block_options)
            stats = merge_stats([stats, part])
        # 3. The float64 epilogue over the whole vocabulary.
        weights = target_weights(rows_labels, class_weight)
        coefs = finish_rows(stats, rows_labels, weights, sample_weight[row_lo:row_hi], options)
        loss[row_lo:row_hi] = coefs.loss
    return loss


def loss_and_grads(
    ops: LinearOps,
    fused_rows: FusedRows,
    hidden: Any,
    weight: Any,
    bias: Optional[Any],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    blocks: LinearBlocks,
    grads: Grads,
) -> np.ndarray:
    """Per-row losses float64 (N,), filling ``grads`` (schedule 2 of the module docstring).

    ``fused_rows`` is the backend's fused launcher (``fused_xent``: rows, labels, sample
    weights, options; ``want_grad``, ``inplace``) applied to a chunk of whole rows.
    ``grads.weight`` and ``grads.bias`` must start at zero; ``grads.hidden`` is written.
    """
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    loss = np.zeros(num_rows)
    if num_rows == 0:
        return loss
    buffer = ops.empty((blocks.grad_rows, num_classes))
    for lo in range(0, num_rows, blocks.grad_rows):
        hi = min(lo + blocks.grad_rows, num_rows)
        chunk_hidden = hidden[lo:hi]
        # 1. The chunk's logits over the whole vocabulary (one GEMM).
        chunk = ops.logits(chunk_hidden, weight, bias, buffer[: hi - lo])
        # 2. Loss and d(loss)/d(logits) in place: each row swept for its statistics, then for its
        #    gradient while it is still in L2.
        chunk_loss, chunk_grad, _ = fused_rows(
            chunk, labels[lo:hi], sample_weight[lo:hi], options, want_grad=True, inplace=True
        )
        loss[lo:hi] = chunk_loss
        # 3. Back through the linear layer: dX rows written once, dW and db accumulated.
        if grads.hidden is not None:
            ops.hidden_grad(chunk_grad, weight, grads.hidden[lo:hi])
        if grads.weight is not None:
            ops.accumulate_weight_grad(chunk_grad, chunk_hidden, grads.weight)
        if grads.bias is not None:
            ops.accumulate_bias_grad(chunk_grad, grads.bias)
    return loss
