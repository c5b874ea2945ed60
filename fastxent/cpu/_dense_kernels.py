"""Numba kernels for cross-entropy against dense targets (one-hot or soft label rows).

Private: the launcher in ``dense.py`` calls these. One row of logits ``x``, its target row ``t``,
optional class weights ``w`` and label smoothing ``eps`` give the per-class target mass

    a_c = w_c ((1 - eps) t_c + eps / C)                       (Keras' and PyTorch's smoothing)

and the loss ``sum_c a_c (lse - x_c)``, whose gradient is ``A softmax_j - a_j`` with
``A = sum_c a_c``. One sweep per block of the row gathers, relative to a running reference
``r`` (the running max, or 0 while every logit seen is -inf):

    sum_exp   sum_c exp(x_c - r)
    mass      sum_c a_c                       (= A)
    distance  sum_c a_c (r - x_c)             (a_c = 0 contributes exactly 0, even at x_c = -inf)

so the loss is ``distance + mass * log(sum_exp)``. Each term of ``distance`` is non-negative for
non-negative targets, so nothing cancels even for logits of magnitude 1e30; when the reference
moves up by ``d`` the partial distance grows by ``mass * d``. A second sweep over the row (still
warm in L2) writes the gradient.

Probability inputs (``from_logits=False``) follow Keras' ``categorical_crossentropy``: each row
is divided by its sum, clipped to [1e-7, 1 - 1e-7] (float32 bounds) and ``-sum_c a_c log q_c``
is taken; the gradient goes back through the clip and the division.

Storage and compute types are those of ``_kernels.py``: float32/float64, and half precision as
raw bits (int16 = float16, uint16 = bfloat16; see ``_bits.py``); targets are stored in the
logits' storage type. Inner loops run over slices with ``range(len)`` so Numba drops its
negative-index checks and LLVM vectorizes them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from fastxent.cpu._bits import as_compute, from_compute, from_order_key, order_key, to_compute
from fastxent.cpu._constants import BLOCK, FASTMATH, PROB_EPS, PROB_ONE_MINUS_EPS
from fastxent.cpu._kernels import class_weight_range, segment_max
from fastxent.cpu._math import exp_c

# Fast-math goes on the leaf loops only (segment_terms, logit_row_grad, the probability row's
# loops); the row drivers, which hold the block merge and the loss, are compiled without it
# (see ``_constants.py``).


def weight_of(weights, j, like):
    """weights[j] in the compute type of ``like``, or 1 when ``weights`` is None (stub)."""
    return 1.0 if weights is None else weights[j]


@overload(weight_of, inline="always")
def _weight_of_overload(weights, j, like):
    if weights is None or weights == types.none:
        return lambda weights, j, like: as_compute(1.0, like)
    # The launcher passes the weights already in the compute type: no conversion in the loop.
    return lambda weights, j, like: weights[j]


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def target_mass(raw_target, weight, keep, uniform):
    """a_c = w_c ((1 - eps) t_c + eps / C) in the compute type (``keep`` = 1 - eps, ``uniform`` = eps / C)."""
    return weight * (keep * to_compute(raw_target) + uniform)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_terms(segment, targets, weights, reference, keep, uniform):
    """(sum exp(x - r), sum a, sum a (r - x)) over one block, in compute-type lanes."""
    zero = as_compute(0.0, segment[0])
    sum_exp = zero
    mass = zero
    distance = zero
    for j in range(segment.shape[0]):
        value = to_compute(segment[j])
        amount = target_mass(targets[j], weight_of(weights, j, segment[0]), keep, uniform)
        sum_exp += exp_c(value - reference)
        mass += amount
        # A zero mass contributes exactly 0, also where x = -inf (0 * inf would be NaN).
        distance += amount * (reference - value) if amount != zero else zero
    return np.float64(sum_exp), np.float64(mass), np.float64(distance)


@njit(cache=True, error_model="numpy")
def logit_row_stats(row, targets, class_weight, keep, uniform):
    """(reference, sum_exp, mass, distance) of one row of logits, block by block."""
    width = row.shape[0]
    running_max = as_compute(-np.inf, row[0])
    # Sums are taken relative to 0 while every logit seen is -inf: exp(-inf - (-inf)) is NaN.
    reference = as_compute(0.0, row[0])
    sum_exp = 0.0
    mass = 0.0
    distance = 0.0
    for block_lo in range(0, width, BLOCK):
        block_hi = min(block_lo + BLOCK, width)
        segment = row[block_lo:block_hi]
        block_max = segment_max(segment, None)
        if block_max > running_max:
            # exp(old_max - new_max) is 0 for an old max of -inf: the old sum is 0 there anyway.
            sum_exp *= math.exp(np.float64(running_max) - np.float64(block_max))
            if mass != 0.0:
                distance += mass * (np.float64(block_max) - np.float64(reference))
            running_max = block_max
            reference = block_max
        block_sum, block_mass, block_distance = segment_terms(
            segment,
            targets[block_lo:block_hi],
            class_weight_range(class_weight, block_lo, block_hi),
            reference,
            keep,
            uniform,
        )
        sum_exp += block_sum
        mass += block_mass
        distance += block_distance
    return reference, sum_exp, mass, distance


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def logit_row_grad(row, targets, row_out, class_weight, keep, uniform, reference, coef_p, coef_a):
    """Write coef_p exp(x_j - r) - coef_a a_j over the row."""
    prob_coef = as_compute(coef_p, row[0])
    mass_coef = as_compute(coef_a, row[0])
    for j in range(row.shape[0]):
        value = to_compute(row[j])
        amount = target_mass(targets[j], weight_of(class_weight, j, row[0]), keep, uniform)
        row_out[j] = from_compute(prob_coef * exp_c(value - reference) - mass_coef * amount, row_out[0])


@njit(parallel=True, cache=True, error_model="numpy")
def logit_rows(
    logits, targets, grad_out, class_weight, keep, uniform, sample_weight, grad_scale, unit_mass_grad, loss_out
):
    """Row-parallel loss (and gradient into ``grad_out`` unless it is None) for logits (N, C).

    targets: (N, C) in the logits' storage type. class_weight: None or (C,) in the compute type.
    sample_weight: float64 (N,). grad_scale: the reduction's factor on each row's gradient.
    unit_mass_grad: write softmax - a instead of (sum a) softmax - a, which is what TensorFlow's
    softmax_cross_entropy_with_logits returns as its gradient (equal when target rows sum to 1).
    """
    num_rows = logits.shape[0]
    for i in prange(num_rows):
        row = logits[i]
        row_targets = targets[i]
        # 1. one sweep: running max, exp-sum, target mass and distance, block by block
        reference, sum_exp, mass, distance = logit_row_stats(row, row_targets, class_weight, keep, uniform)
        # 2. loss: sum_c a_c (lse - x_c) = distance + mass * log(sum_exp)
        loss_out[i] = sample_weight[i] * (distance + mass * math.log(sum_exp))
        # 3. gradient: mass * softmax_j - a_j, softmax_j = exp(x_j - r) / sum_exp
        if grad_out is not None:
            row_scale = grad_scale * sample_weight[i]
            prob_mass = 1.0 if unit_mass_grad else mass
            logit_row_grad(
                row,
                row_targets,
                grad_out[i],
                class_weight,
                keep,
                uniform,
                reference,
                row_scale * prob_mass / sum_exp,
                row_scale,
            )


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def clip_prob(value):
    """Keras' clip to [1e-7, 1 - 1e-7] with the bounds in the compute type; NaN passes through."""
    low = as_compute(PROB_EPS, value)
    high = as_compute(PROB_ONE_MINUS_EPS, value)
    value = low if value < low else value
    return high if value > high else value


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def prob_row_sum(row):
    """(sum p, min p) of one row of probabilities, block sums in compute-type lanes."""
    total = 0.0
    smallest = order_key(to_compute(row[0]))
    for block_lo in range(0, row.shape[0], BLOCK):
        segment = row[block_lo : min(block_lo + BLOCK, row.shape[0])]
        block_total = as_compute(0.0, row[0])
        for j in range(segment.shape[0]):
            value = to_compute(segment[j])
            key = order_key(value)
            smallest = key if key < smallest else smallest
            block_total += value
        total += block_total
    return total, np.float64(from_order_key(smallest))


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def prob_slope(raw, inverse_sum, amount):
    """(q, dL/dq) for one class: q = p / sum p, dL/dq = -a / clip(q) where 1e-7 <= q <= 1 - 1e-7,
    else 0 (clip's derivative is 1 inside its bounds, both included as in TensorFlow, 0 outside)."""
    normalised = to_compute(raw) * inverse_sum
    low = as_compute(PROB_EPS, normalised)
    high = as_compute(PROB_ONE_MINUS_EPS, normalised)
    inside = normalised >= low and normalised <= high
    slope = -amount / clip_prob(normalised)
    return normalised, slope if inside else as_compute(0.0, normalised)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def prob_row_loss(row, targets, class_weight, keep, uniform, inverse_sum):
    """(-sum a log clip(q), G = sum (dL/dq) q) of one row, q = p / sum p (G: the division's gradient)."""
    loss = 0.0
    slope_dot = 0.0
    for j in range(row.shape[0]):
        amount = target_mass(targets[j], weight_of(class_weight, j, row[0]), keep, uniform)
        normalised, slope = prob_slope(row[j], inverse_sum, amount)
        if amount != 0:
            loss -= amount * math.log(clip_prob(normalised))
        slope_dot += slope * normalised
    return loss, slope_dot


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def prob_row_grad(row, targets, row_out, class_weight, keep, uniform, inverse_sum, coef, shift):
    """Write coef (dL/dq_j - shift) over the row: the gradient through the division."""
    for j in range(row.shape[0]):
        amount = target_mass(targets[j], weight_of(class_weight, j, row[0]), keep, uniform)
        _, slope = prob_slope(row[j], inverse_sum, amount)
        row_out[j] = from_compute(coef * (slope - shift), row_out[0])


@njit(parallel=True, cache=True, error_model="numpy")
def prob_rows(probs, targets, grad_out, class_weight, keep, uniform, sample_weight, grad_scale, loss_out, row_min_out):
    """Row-parallel loss (and gradient unless ``grad_out`` is None) for probabilities (N, C).

    row_min_out receives each row's smallest input so the caller can reject negative values.
    This is a compatibility path (Keras' ``from_logits=False``): its log is a scalar libm call.
    """
    num_rows = probs.shape[0]
    for i in prange(num_rows):
        row = probs[i]
        row_targets = targets[i]
        # 1. the row's sum (Keras divides by it) and its minimum
        row_sum, row_min_out[i] = prob_row_sum(row)
        inverse_sum = as_compute(1.0 / row_sum, row[0])
        # 2. loss -sum a log clip(q), and G = sum (dL/dq) q for the division's gradient
        loss, slope_dot = prob_row_loss(row, row_targets, class_weight, keep, uniform, inverse_sum)
        loss_out[i] = sample_weight[i] * loss
        # 3. gradient through the division: dL/dp_j = (dL/dq_j - G) / sum p
        if grad_out is not None:
            coef = as_compute(grad_scale * sample_weight[i] / row_sum, row[0])
            shift = as_compute(slope_dot, row[0])
            prob_row_grad(row, row_targets, grad_out[i], class_weight, keep, uniform, inverse_sum, coef, shift)
