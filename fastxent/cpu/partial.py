"""Per-row partial statistics over a class range, their exact merge, and the gradient from them.

This is the primitive behind the split-row mode (few long rows: each cut into parts that
threads take independently) and behind vocabulary-parallel training (each process holds one
class range of every row; the statistics are combined by collectives, never the logits).

A range's statistics, each float64 (N,):

    row_max       max of the (softcapped) logits in the range; 0 for probabilities
    sum_exp       sum of exp(v - row_max) (taken relative to 0 while row_max is -inf);
                  for probabilities, the sum of the clipped probabilities
    target_value  v_y, or log clip(p_y), where the row's target lies in the range, else 0
    target_input  the raw input x_y where the target lies in the range, else 0
    weighted_sum  sum of w_c v_c (or w_c log clip(p_c)) when label smoothing needs it, else 0
    row_min       smallest input in the range (probabilities only; +inf otherwise)

Merging two disjoint ranges: row_max takes the max, sum_exp is rescaled to it and added, the
target and weighted sums add, row_min takes the min. It is exact and order-independent up to
float64 rounding.

Labels given to these functions are local to the range: the target's offset in the range,
``IGNORED`` (-1) for a row that is not counted, ``ELSEWHERE`` (-2) for a counted row whose target
lies in another range.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from fastxent._options import KernelOptions
from fastxent.cpu import _kernels
from fastxent.cpu._threading import threading_layer_in_use  # noqa: F401  (layer chosen first)

IGNORED = _kernels.IGNORED
ELSEWHERE = _kernels.ELSEWHERE


class RowStats(NamedTuple):
    """Partial statistics of every row over one class range (see the module docstring)."""

    row_max: np.ndarray
    sum_exp: np.ndarray
    target_value: np.ndarray
    target_input: np.ndarray
    weighted_sum: np.ndarray
    row_min: np.ndarray


class RowCoefficients(NamedTuple):
    """Per-row loss and gradient coefficients: dL/dv_j = coef_p e^(v_j - max) - coef_t [j=y] - coef_w w_j."""

    loss: np.ndarray
    coef_p: np.ndarray
    coef_t: np.ndarray
    coef_w: np.ndarray


def _storage(rows: np.ndarray) -> np.ndarray:
    from fastxent.cpu.xent import storage_view

    return storage_view(rows)


def local_labels(global_labels: np.ndarray, range_start: int, range_width: int) -> np.ndarray:
    """Map int64 labels over the whole vocabulary (-1 = ignored) to labels local to a range.

    Returns int64 (N,): the offset in [0, range_width) where the target lies in the range,
    IGNORED for ignored rows, ELSEWHERE for the others.
    """
    offsets = global_labels - range_start
    inside = (global_labels >= 0) & (offsets >= 0) & (offsets < range_width)
    return np.where(global_labels == IGNORED, IGNORED, np.where(inside, offsets, ELSEWHERE)).astype(np.int64)


def range_stats(
    rows: np.ndarray, labels: np.ndarray, options: KernelOptions, part_bounds: Optional[np.ndarray] = None
) -> RowStats:
    """Statistics of rows (N, W) over their whole width, computed in parts and merged.

    Args:
        rows: C-contiguous (N, W) logits or probabilities (float16/bfloat16/float32/float64).
        labels: int64 (N,) local labels (see ``local_labels``).
        options: ``class_weight`` must be this range's (W,) weights or None.
        part_bounds: int64 (P + 1,) offsets cutting each row into parts for the threads;
            None for one part per row.
    """
    num_rows, width = rows.shape
    if part_bounds is None:
        part_bounds = np.array([0, width], dtype=np.int64)
    num_parts = part_bounds.shape[0] - 1
    source = _storage(rows)
    part_max = np.empty((num_rows, num_parts))
    part_sum = np.empty((num_rows, num_parts))
    part_weighted = np.empty((num_rows, num_parts))
    part_min = np.empty((num_rows, num_parts))
    if num_rows and width:
        _kernels.parts_stats(
            source,
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
    else:
        part_max.fill(-np.inf)
        part_sum.fill(0.0)
        part_weighted.fill(0.0)
        part_min.fill(np.inf)
    row_max = np.empty(num_rows)
    sum_exp = np.empty(num_rows)
    _kernels.merge_parts(part_max, part_sum, row_max, sum_exp)
    target_value = np.empty(num_rows)
    target_input = np.empty(num_rows)
    if num_rows and width:
        _kernels.targets_value(source, labels, not options.from_logits, options.softcap, target_value, target_input)
    else:
        target_value.fill(0.0)
        target_input.fill(0.0)
    return RowStats(row_max, sum_exp, target_value, target_input, part_weighted.sum(axis=1), part_min.min(axis=1))


def merge_stats(parts: Sequence[RowStats]) -> RowStats:
    """Exact merge of the statistics of disjoint class ranges of the same rows."""
    if not parts:
        raise ValueError("merge_stats needs at least one RowStats")
    part_max = np.stack([p.row_max for p in parts], axis=1)
    part_sum = np.stack([p.sum_exp for p in parts], axis=1)
    row_max = np.empty(part_max.shape[0])
    sum_exp = np.empty(part_max.shape[0])
    _kernels.merge_parts(part_max, part_sum, row_max, sum_exp)
    return RowStats(
        row_max,
        sum_exp,
        np.sum([p.target_value for p in parts], axis=0),
        np.sum([p.target_input for p in parts], axis=0),
        np.sum([p.weighted_sum for p in parts], axis=0),
        np.min([p.row_min for p in parts], axis=0),
    )


def rescale_sum_exp(row_max: np.ndarray, sum_exp: np.ndarray, new_max: np.ndarray) -> np.ndarray:
    """sum_exp taken relative to ``row_max``, moved to ``new_max`` (>= row_max), as the merge does.

    Equal maxima keep the sum unchanged (so all -inf ranges add instead of giving NaN).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        factor = np.where(row_max == new_max, 1.0, np.exp(row_max - new_max))
    return sum_exp * factor


def finish_rows(
    stats: RowStats, labels: np.ndarray, target_weight: np.ndarray, sample_weight: np.ndarray, options: KernelOptions
) -> RowCoefficients:
    """Loss of every row and its gradient coefficients from merged statistics (whole vocabulary).

    Args:
        stats: statistics merged over the whole class axis.
        labels: int64 (N,); only IGNORED matters here.
        target_weight: float64 (N,), class_weight[y] (1 without class weights).
        sample_weight: float64 (N,).
        options: ``class_weight_total`` and ``num_classes`` over the whole vocabulary.
    """
    num_rows = stats.row_max.shape[0]
    loss = np.empty(num_rows)
    coef_p = np.empty(num_rows)
    coef_t = np.empty(num_rows)
    coef_w = np.empty(num_rows)
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
        part_bounds = np.array([0, width], dtype=np.int64)
    grad = rows if inplace else (np.empty_like(rows) if out is None else out)
    if num_rows == 0 or width == 0:
        return grad
    source = _storage(rows)
    dest = source if inplace else _storage(grad)
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


def target_grads(
    labels: np.ndarray, stats: RowStats, coefs: RowCoefficients, target_weight: np.ndarray, options: KernelOptions
) -> Tuple[np.ndarray, np.ndarray]:
    """The whole gradient at the target of every row whose target lies in this range, formed in
    float64 by the CPU kernel's own code (for backends that write the target entry apart).

    Returns (rows int64 (K,), float64 (K,) gradients), K the rows with a target here.
    """
    owned = np.flatnonzero(labels >= 0)
    values = np.zeros((owned.size, 1))
    if owned.size:
        _kernels.targets_grad(
            values,
            np.zeros(owned.size, dtype=np.int64),
            not options.from_logits,
            stats.target_value[owned],
            stats.target_input[owned],
            target_weight[owned],
            stats.row_max[owned],
            coefs.coef_p[owned],
            coefs.coef_t[owned],
            coefs.coef_w[owned],
            options.softcap,
        )
    return owned, values[:, 0]


def target_weights(labels: np.ndarray, class_weight: Optional[np.ndarray]) -> np.ndarray:
    """class_weight[label] per row (1.0 without class weights; 0.0 for rows without a label)."""
    if class_weight is None:
        return np.ones(labels.shape[0])
    has_target = labels >= 0
    weights = np.zeros(labels.shape[0])
    # Indexing only the rows with a target here also works for an empty (zero-width) range.
    weights[has_target] = class_weight[labels[has_target]]
    return weights


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
    coefs = finish_rows(stats, labels, weights, sample_weight, options)
    grad = None
    if want_grad:
        grad = range_grad(
            rows, labels, stats, coefs, weights, options, inplace=inplace, part_bounds=part_bounds, out=grad_out
        )
    return coefs.loss, grad, stats
