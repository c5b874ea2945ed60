"""The range layer: per-row statistics of a class range, their exact merge, and the float64
epilogue that turns merged statistics into losses and gradient coefficients.

Every path of fastxent is built on this primitive, and it belongs to no backend: the CPU
(``fastxent.cpu``), CUDA (``fastxent.gpu``), torch-tensor and vocabulary-parallel
(``fastxent.distributed``) paths all compute a range's statistics with their own kernels and
hand them here. Nothing in this module imports a backend or a framework; its array code is
NumPy on O(N) host numbers, except ``target_grads``, which takes the array module to use
(NumPy, or CuPy on the device).

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

Labels given to a range are local to it: the target's offset in the range, ``IGNORED`` (-1) for
a row that is not counted, ``ELSEWHERE`` (-2) for a counted row whose target lies in another
range.

A backend implements ``RangeKernel`` (statistics, gradient and target values of a range); the
callers combine kernels with ``local_labels``, ``merge_stats``, ``target_weights`` and
``finish_rows``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np

from fastxent._options import KernelOptions

# Label encoding of a class range (the kernels of every backend use the same values).
IGNORED = -1
ELSEWHERE = -2

# Keras' epsilon(): probabilities are clipped to [PROB_EPS, PROB_ONE_MINUS_EPS], the bounds
# rounded to the compute type (float32, or float64 for float64 input) as Keras clips in the
# input's dtype.
PROB_EPS = 1e-7
PROB_ONE_MINUS_EPS = 1.0 - 1e-7


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

    def scaled(self, factor: Any) -> "RowCoefficients":
        """The gradient coefficients times ``factor`` (a scalar or one per row); the loss as is."""
        return RowCoefficients(self.loss, self.coef_p * factor, self.coef_t * factor, self.coef_w * factor)


class RangeKernel(Protocol):
    """What a backend provides for rows (N, W) of one class range, in its own array type.

    Labels are local int64 (N,) NumPy arrays; statistics and coefficients are NumPy float64 on
    the host (O(N) numbers), whatever the rows' device.
    """

    def stats(self, rows: Any, labels: np.ndarray, options: KernelOptions) -> RowStats:
        """Statistics of the rows over their whole width (``options.class_weight``: this
        range's (W,) weights or None)."""

    def grad(
        self,
        rows: Any,
        labels: np.ndarray,
        stats: RowStats,
        coefs: RowCoefficients,
        target_weight: np.ndarray,
        options: KernelOptions,
        *,
        inplace: bool,
    ) -> Any:
        """The range's gradient from statistics merged over the whole vocabulary: ``rows``
        itself when ``inplace``, else a new array like it."""

    def targets(self, rows: Any, labels: np.ndarray, options: KernelOptions) -> Tuple[np.ndarray, np.ndarray]:
        """(target_value, target_input) float64 (N,) where the target lies in the range, 0 elsewhere."""


def neutral_stats(num_rows: int) -> RowStats:
    """The merge's identity: the statistics of an empty range."""
    zeros = np.zeros(num_rows)
    return RowStats(np.full(num_rows, -np.inf), zeros, zeros, zeros, zeros, np.full(num_rows, np.inf))


def local_labels(global_labels: np.ndarray, range_start: int, range_width: int) -> np.ndarray:
    """Map int64 labels over the whole vocabulary (-1 = ignored) to labels local to a range.

    Returns int64 (N,): the offset in [0, range_width) where the target lies in the range,
    IGNORED for ignored rows, ELSEWHERE for the others.
    """
    offsets = global_labels - range_start
    inside = (global_labels >= 0) & (offsets >= 0) & (offsets < range_width)
    return np.where(global_labels == IGNORED, IGNORED, np.where(inside, offsets, ELSEWHERE)).astype(np.int64)


def rescale_sum_exp(row_max: np.ndarray, sum_exp: np.ndarray, new_max: np.ndarray) -> np.ndarray:
    """sum_exp taken relative to ``row_max``, moved to ``new_max`` (>= row_max), as the merge does.

    Equal maxima keep the sum unchanged (so all -inf ranges add instead of giving NaN).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        factor = np.where(row_max == new_max, 1.0, np.exp(row_max - new_max))
    return sum_exp * factor


def merge_stats(parts: Sequence[RowStats]) -> RowStats:
    """Exact merge of the statistics of disjoint class ranges of the same rows."""
    if not parts:
        raise ValueError("merge_stats needs at least one RowStats")
    row_max = np.max([p.row_max for p in parts], axis=0)
    sum_exp = np.sum([rescale_sum_exp(p.row_max, p.sum_exp, row_max) for p in parts], axis=0)
    return RowStats(
        row_max,
        sum_exp,
        np.sum([p.target_value for p in parts], axis=0),
        np.sum([p.target_input for p in parts], axis=0),
        np.sum([p.weighted_sum for p in parts], axis=0),
        np.min([p.row_min for p in parts], axis=0),
    )


def target_weights(labels: np.ndarray, class_weight: Optional[np.ndarray]) -> np.ndarray:
    """class_weight[label] per row (1.0 without class weights; 0.0 for rows without a label)."""
    if class_weight is None:
        return np.ones(labels.shape[0])
    has_target = labels >= 0
    weights = np.zeros(labels.shape[0])
    # Indexing only the rows with a target here also works for an empty (zero-width) range.
    weights[has_target] = class_weight[labels[has_target]]
    return weights


def compute_dtype(dtype: Any) -> np.dtype:
    """The type kernels compute in for a storage dtype: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def target_values(raw: np.ndarray, options: KernelOptions) -> Tuple[np.ndarray, np.ndarray]:
    """(v_y, x_y) in float64 from the targets' raw inputs, already widened to the compute type.

    Logits: v_y is the (softcapped) logit, the softcap taken in the compute type. Probabilities:
    v_y = log clip(p_y), the clip in the compute type (Keras' bounds) and the log in float64.
    """
    raw = np.asarray(raw)
    compute = raw.dtype.type
    if options.from_logits:
        value = raw
        if options.softcap is not None:
            cap = compute(options.softcap)
            value = cap * np.tanh(raw / cap)
    else:
        clipped = np.clip(raw, compute(PROB_EPS), compute(PROB_ONE_MINUS_EPS))
        value = np.log(clipped.astype(np.float64))
    return value.astype(np.float64), raw.astype(np.float64)


def finish_rows(
    stats: RowStats, labels: np.ndarray, target_weight: np.ndarray, sample_weight: np.ndarray, options: KernelOptions
) -> RowCoefficients:
    """Loss of every row and its gradient coefficients from merged statistics (float64, host).

    Args:
        stats: statistics merged over the whole class axis.
        labels: int64 (N,); only IGNORED matters here (those rows get zeros).
        target_weight: float64 (N,), class_weight[y] (1 without class weights).
        sample_weight: float64 (N,).
        options: ``class_weight_total`` and ``num_classes`` over the whole vocabulary;
            ``grad_scale`` the reduction's factor.

    With lse = row_max + log(sum_exp) and the target part a = (1 - eps) w_y, the loss is
    a (lse - v_y) [+ eps / C (W lse - sum_c w_c v_c)] [+ z w_y lse^2], times the sample weight.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        row_max = np.asarray(stats.row_max, dtype=np.float64)
        sum_exp = np.asarray(stats.sum_exp, dtype=np.float64)
        target_weight = np.asarray(target_weight, dtype=np.float64)
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        smoothing, z_loss, total = options.label_smoothing, options.z_loss, options.class_weight_total
        log_sum = np.log(sum_exp)
        lse = row_max + log_sum
        # lse - v_y as (max - v_y) + log(sum): exact even for logits of magnitude 1e30.
        nll = (row_max - stats.target_value) + log_sum
        target_part = (1.0 - smoothing) * target_weight
        loss = target_part * nll
        smooth_coef = 0.0
        if smoothing != 0.0:
            smooth_coef = smoothing / options.num_classes
            loss = loss + smooth_coef * ((total * row_max - stats.weighted_sum) + total * log_sum)
        if z_loss != 0.0:
            loss = loss + z_loss * target_weight * lse * lse
        loss = loss * sample_weight
        row_scale = options.grad_scale * sample_weight
        coef_p = row_scale * (target_part + smooth_coef * total + 2.0 * z_loss * target_weight * lse)
        # softmax_j = exp(v_j - row_max) / sum_exp: fold 1 / sum_exp into the coefficient.
        coef_p = coef_p / sum_exp
        coef_t = row_scale * target_part
        coef_w = row_scale * smooth_coef
    counted = np.asarray(labels) != IGNORED
    return RowCoefficients(
        np.where(counted, loss, 0.0),
        np.where(counted, coef_p, 0.0),
        np.where(counted, coef_t, 0.0),
        np.where(counted, coef_w, 0.0),
    )


def target_grads(
    labels: Any,
    stats: RowStats,
    coefs: RowCoefficients,
    target_weight: Any,
    options: KernelOptions,
    *,
    compute: Any = np.float64,
    xp: Any = np,
):
    """The whole gradient at the target of every row whose target lies in this range, in
    float64 (for backends that write the target entry apart from the sweep, so softmax_y - 1 is
    formed in float64 and rounded once).

    ``xp`` is the array module the arrays live in (NumPy, or CuPy with every argument on the
    device); ``compute`` the kernels' compute type, which rounds the probability clip bounds.
    Returns float64 (N,), 0 on rows without a target here.
    """
    owned = labels >= 0
    coef_p, coef_t, coef_w = coefs.coef_p, coefs.coef_t, coefs.coef_w
    if options.from_logits:
        value = stats.target_value
        row_max = stats.row_max
        reference = xp.where(row_max > -np.inf, row_max, 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            grad = coef_p * xp.exp(value - reference) - coef_t - coef_w * target_weight
            if options.softcap is not None:
                ratio = value / options.softcap
                grad = grad * (1.0 - ratio * ratio)
    else:
        probability = stats.target_input
        low = float(np.asarray(PROB_EPS, dtype=compute))
        high = float(np.asarray(PROB_ONE_MINUS_EPS, dtype=compute))
        inside = (probability >= low) & (probability <= high)
        with np.errstate(divide="ignore", invalid="ignore"):
            grad = xp.where(inside, coef_p - (coef_t + coef_w * target_weight) / probability, 0.0)
    return xp.where(owned, grad, 0.0)
