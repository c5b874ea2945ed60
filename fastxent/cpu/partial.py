"""The CPU backend of the range layer (``fastxent._range``): statistics and gradient of a class
range of NumPy rows with the Numba kernels.

This is the primitive behind the split-row mode (few long rows: each cut into parts that
threads take independently, merged exactly) and behind vocabulary-parallel training (each
process holds one class range of every row; the statistics are combined by collectives, never
the logits). Labels are local to the range (``fastxent._range.local_labels``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastxent._options import KernelOptions
from fastxent._range import RowCoefficients, RowStats, target_weights
from fastxent.cpu import _kernels
from fastxent.cpu._threading import threading_layer_in_use  # noqa: F401  (layer chosen first)
from fastxent.cpu.storage import storage_view


def _whole_row(width: int) -> np.ndarray:
    return np.array([0, width], dtype=np.int64)


def targets(rows: np.ndarray, labels: np.ndarray, options: KernelOptions) -> Tuple[np.ndarray, np.ndarray]:
    """(target_value, target_input) float64 (N,) where the target lies in the range, 0 elsewhere."""
    num_rows, width = rows.shape
    target_value = np.zeros(num_rows)
    target_input = np.zeros(num_rows)
    if num_rows and width:
        _kernels.targets_value(
            storage_view(rows), labels, not options.from_logits, options.softcap, target_value, target_input
        )
    return target_value, target_input


def range_stats(
    rows: np.ndarray, labels: np.ndarray, options: KernelOptions, part_bounds: Optional[np.ndarray] = None
) -> RowStats:
    """Statistics of rows (N, W) over their whole width, computed in parts and merged.

    Args:
        rows: C-contiguous (N, W) logits or probabilities (float16/bfloat16/float32/float64).
        labels: int64 (N,) local labels (see ``fastxent._range.local_labels``).
        options: ``class_weight`` must be this range's (W,) weights or None.
        part_bounds: int64 (P + 1,) offsets cutting each row into parts for the threads;
            None for one part per row.
    """
    num_rows, width = rows.shape
    if part_bounds is None:
        part_bounds = _whole_row(width)
    num_parts = part_bounds.shape[0] - 1
    part_max = np.full((num_rows, num_parts), -np.inf)
    part_sum = np.zeros((num_rows, num_parts))
    part_weighted = np.zeros((num_rows, num_parts))
    part_min = np.full((num_rows, num_parts), np.inf)
    if num_rows and width:
        _kernels.parts_stats(
            storage_view(rows),
            labels,
            part_bounds,
            not options.from_logits,
            options.softcap,
            options.class_weight,
            options.label_smoothing != 0.0,
            part_max,
            part_sum,
            part_weighted,
            part_min,
        )
    row_max = np.empty(num_rows)
    sum_exp = np.empty(num_rows)
    _kernels.merge_parts(part_max, part_sum, row_max, sum_exp)
    target_value, target_input = targets(rows, labels, options)
    return RowStats(row_max, sum_exp, target_value, target_input, part_weighted.sum(axis=1), part_min.min(axis=1))


def range_grad(
    rows: np.ndarray,
    labels: np.ndarray,
    stats: RowStats,
    coefs: RowCoefficients,
    target_weight: np.ndarray,
    options: KernelOptions,
    *,
    inplace: bool = False,
    part_bounds: Optional[np.ndarray] = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Gradient of the loss w.r.t. rows (N, W) of one class range, from merged statistics.

    ``stats`` must be merged over the whole vocabulary (global row_max; target values where the
    target lies in this range, as ``range_stats`` gives them). Returns a new array with the rows'
    shape and dtype (``out`` when given: a C-contiguous buffer like ``rows``), or ``rows``
    itself holding the gradient when ``inplace``.
    """
    num_rows, width = rows.shape
    if part_bounds is None:
        part_bounds = _whole_row(width)
    grad = rows if inplace else (np.empty_like(rows) if out is None else out)
    if num_rows == 0 or width == 0:
        return grad
    source = storage_view(rows)
    dest = source if inplace else storage_view(grad)
    _kernels.parts_grad(
        source,
        True if inplace else dest,
        labels,
        part_bounds,
        not options.from_logits,
        stats.row_max,
        coefs.coef_p,
        coefs.coef_w,
        options.class_weight,
        options.softcap,
    )
    # The target entries apart, formed in float64 and rounded once.
    _kernels.targets_grad(
        dest,
        labels,
        not options.from_logits,
        stats.target_value,
        stats.target_input,
        target_weight,
        stats.row_max,
        coefs.coef_p,
        coefs.coef_t,
        coefs.coef_w,
        options.softcap,
    )
    return grad


def fused_epilogue(
    stats: RowStats, labels: np.ndarray, target_weight: np.ndarray, sample_weight: np.ndarray, options: KernelOptions
) -> RowCoefficients:
    """``fastxent._range.finish_rows`` computed by the row kernels' own Numba epilogue: the same
    float64 formula, without the NumPy calls' fixed cost (tens of microseconds) on the split-row
    path, where a handful of rows take little more."""
    num_rows = stats.row_max.shape[0]
    loss, coef_p, coef_t, coef_w = (np.empty(num_rows) for _ in range(4))
    _kernels.epilogue_rows(
        stats.row_max,
        stats.sum_exp,
        stats.target_value,
        stats.weighted_sum,
        labels,
        sample_weight,
        target_weight,
        options.class_weight_total,
        options.num_classes,
        options.label_smoothing,
        options.z_loss,
        options.grad_scale,
        loss,
        coef_p,
        coef_t,
        coef_w,
    )
    return RowCoefficients(loss, coef_p, coef_t, coef_w)


def split_rows(
    rows: np.ndarray,
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    part_bounds: np.ndarray,
    *,
    want_grad: bool,
    inplace: bool,
    grad_out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray], RowStats]:
    """Loss and gradient of few long rows, cut into parts (labels: int64, -1 ignored)."""
    stats = range_stats(rows, labels, options, part_bounds)
    weights = target_weights(labels, options.class_weight)
    coefs = fused_epilogue(stats, labels, weights, sample_weight, options)
    grad = None
    if want_grad:
        grad = range_grad(
            rows, labels, stats, coefs, weights, options, inplace=inplace, part_bounds=part_bounds, out=grad_out
        )
    return coefs.loss, grad, stats
