"""CPU launchers: allocate outputs, pick the kernel variant, call it.

Input here is already validated and normalised by ``fastxent._api``: logits are a C-contiguous
(N, C) array, labels int64 (N,) with -1 for ignored rows, sample weights float64 (N,).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastxent._options import KernelOptions
from fastxent._range import RowCoefficients, RowStats
from fastxent.cpu import _kernels, partial
from fastxent.cpu._constants import BLOCK

# Importing _threading selects a fork- and thread-safe layer before the first parallel kernel;
# the bench reports which one runs.
from fastxent.cpu._threading import threading_layer_in_use
from fastxent.cpu.storage import storage_view
from fastxent.cpu.targets import encode_labels

__all__ = [
    "NumpyKernel",
    "encode_labels",
    "fused_xent",
    "part_bounds_for",
    "storage_view",
    "threading_layer_in_use",
    "use_split_rows",
]

# Below this many rows per thread, rows alone cannot keep every thread busy: split each row.
SPLIT_ROWS_PER_THREAD = 2
# Do not split rows shorter than this: per-part overhead would dominate.
SPLIT_MIN_CLASSES = 4 * BLOCK
# Up to this many elements swept (N x C, twice with the gradient) a call runs on the calling
# thread: waking the others costs about 3 us, what one thread takes for some 6000 elements
# (measured on 2 threads, AVX2: 8 x 1000 float32 forward 5.9 us parallel, 5.1 us serial;
# 32 x 1000 12.6 us parallel, 17.9 us serial).
SERIAL_WORK = 16384


def _num_threads() -> int:
    from numba import get_num_threads

    return get_num_threads()


def use_split_rows(num_rows: int, num_classes: int) -> bool:
    """Whether few long rows should be cut into parts so that every thread has work."""
    return num_classes >= SPLIT_MIN_CLASSES and num_rows < SPLIT_ROWS_PER_THREAD * _num_threads()


def part_bounds_for(num_rows: int, num_classes: int) -> np.ndarray:
    """Class offsets (P + 1,) that cut each row into parts of whole blocks, about 4 tasks per thread."""
    wanted = max(1, (4 * _num_threads() + num_rows - 1) // num_rows)
    blocks = (num_classes + BLOCK - 1) // BLOCK
    parts = max(1, min(wanted, blocks))
    bounds = (np.arange(parts + 1, dtype=np.int64) * blocks // parts) * BLOCK
    bounds[-1] = num_classes
    return bounds


def fused_xent(
    logits: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    *,
    want_grad: bool,
    inplace: bool = False,
    grad_out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Per-row loss and, if asked, the gradient of logits (N, C) in one fused call.

    Args:
        logits: C-contiguous (N, C) float16/bfloat16/float32/float64.
        labels: int64 (N,), -1 for ignored rows, otherwise in [0, C).
        sample_weight: float64 (N,).
        options: validated options; ``options.grad_scale`` is the reduction's factor.
        want_grad: also compute d(loss)/d(logits).
        inplace: write the gradient over ``logits`` (only with ``want_grad``).
        grad_out: C-contiguous (N, C) buffer of the logits' dtype to receive the gradient
            instead of a new array (only with ``want_grad``, not with ``inplace``).

    Returns:
        (loss float64 (N,), gradient (N, C) in the logits' dtype or None, row minimum float64
        (N,) for probability inputs or None). The row minimum lets the caller reject
        negative "probabilities".
    """
    num_rows, num_classes = logits.shape
    source = storage_view(logits)
    class_weight = options.class_weight
    grad = None
    if not options.from_logits:
        # Probabilities are a compatibility path: an in-place request still computes into a
        # new buffer, so the input is intact if the caller's check below rejects it.
        row_min = np.empty(num_rows, dtype=np.float64)
        loss = np.empty(num_rows, dtype=np.float64)
        if want_grad:
            grad = np.empty_like(logits) if grad_out is None else grad_out
        _kernels.prob_rows(
            source,
            None if grad is None else storage_view(grad),
            labels,
            sample_weight,
            class_weight,
            options.class_weight_total,
            options.label_smoothing,
            options.z_loss,
            options.grad_scale,
            loss,
            row_min,
        )
        return loss, grad, row_min

    if num_rows and use_split_rows(num_rows, num_classes):
        bounds = part_bounds_for(num_rows, num_classes)
        loss, grad, _ = partial.split_rows(
            logits, labels, sample_weight, options, bounds, want_grad=want_grad, inplace=inplace, grad_out=grad_out
        )
        return loss, grad, None

    loss = np.empty(num_rows, dtype=np.float64)
    work = num_rows * num_classes * (2 if want_grad else 1)
    rows_kernel = _kernels.logit_rows_serial if work <= SERIAL_WORK else _kernels.logit_rows
    args = (
        labels,
        sample_weight,
        class_weight,
        options.class_weight_total,
        options.label_smoothing,
        options.z_loss,
        options.softcap,
        options.grad_scale,
        loss,
    )
    if want_grad and inplace:
        rows_kernel(source, True, *args)
        grad = logits
    elif want_grad:
        # A caller's buffer saves the page faults of a fresh N x C array (measured: as long as
        # the whole in-place forward+backward at 2048 x 128256 float32).
        grad = np.empty_like(logits) if grad_out is None else grad_out
        rows_kernel(source, storage_view(grad), *args)
    else:
        rows_kernel(source, None, *args)
    return loss, grad, None


class NumpyKernel:
    """The range layer's kernel (``fastxent._range.RangeKernel``) for NumPy rows (N, W): the
    Numba class-range kernels, each row cut into parts when there are too few rows for the
    threads."""

    @staticmethod
    def _bounds(rows: np.ndarray) -> Optional[np.ndarray]:
        num_rows, width = rows.shape
        if num_rows and use_split_rows(num_rows, width):
            return part_bounds_for(num_rows, width)
        return None

    def stats(self, rows: np.ndarray, labels: np.ndarray, options: KernelOptions) -> RowStats:
        return partial.range_stats(rows, labels, options, self._bounds(rows))

    def grad(
        self,
        rows: np.ndarray,
        labels: np.ndarray,
        stats: RowStats,
        coefs: RowCoefficients,
        target_weight: np.ndarray,
        options: KernelOptions,
        *,
        inplace: bool,
    ) -> np.ndarray:
        return partial.range_grad(
            rows, labels, stats, coefs, target_weight, options, inplace=inplace, part_bounds=self._bounds(rows)
        )

    def targets(self, rows: np.ndarray, labels: np.ndarray, options: KernelOptions) -> Tuple[np.ndarray, np.ndarray]:
        return partial.targets(rows, labels, options)
