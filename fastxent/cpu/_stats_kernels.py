"""Numba kernels of the per-token statistics (private: ``stats.py`` launches them).

One sweep per row gives four statistics of z = softcap(x) / temperature, block by block (each
block read from memory once, then scanned in L1):

1. the block's max of the raw logits (vectorized over order keys); where it beats the running
   max, the first index holding it is the new argmax (lowest index on ties: a later block must
   be strictly larger) and the running sums are moved to the new max m;
2. S = sum_j e^(z_j - m) and T = sum_j e^(z_j - m) (z_j - m), the entropy's accumulator taken
   relative to m, so that no sum of large z cancels: entropy = log S - T / S, and
   sum_j p_j z_j = m + T / S. Moving both to a new max m' >= m with f = e^(m - m'):
   S' = f S and T' = f (T + (m - m') S).

A class with z = -inf adds 0 to both sums (its term e^(z - m) = 0 multiplies z - m clamped to
a finite floor, so 0 * -inf never forms a NaN).

The gradient of a logprob + b entropy + c lse is one more sweep: with p_j = e^(z_j - m) / S,
d/dz_j = a[j=y] - (a - c) p_j + b p_j (T / S - (z_j - m)), divided by the temperature and
times the softcap's derivative; the target entry is formed apart in float64 and rounded once.

Storage and compute types, fast-math and the indexing rules are those of ``_kernels.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from fastxent._range import IGNORED
from fastxent.cpu._bits import as_compute, from_compute, to_compute
from fastxent.cpu._constants import BLOCK, FASTMATH, SUM_RUN
from fastxent.cpu._kernels import grad_dest, load_logit, out_row, rescale_factor, segment_max
from fastxent.cpu._math import exp_for

# z - m is clamped to this before it multiplies e^(z - m): every term below it is already 0
# (exp flushes below -87), and a masked class's -inf becomes a finite number times 0.
CENTRED_FLOOR = -256.0


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_entropy_sums(segment, reference, softcap, inv_temperature):
    """(sum_j e^(z_j - reference), sum_j e^(z_j - reference) (z_j - reference)) over a segment,
    z_j = softcap(x_j) * inv_temperature; summed in the compute type over runs of ``SUM_RUN``
    and the runs in float64 (see ``_kernels.segment_sum_exp``). NaN anywhere gives NaN."""
    like = segment[0]
    floor = as_compute(CENTRED_FLOOR, like)
    scale = as_compute(inv_temperature, like)
    total = 0.0
    weighted = 0.0
    num = segment.shape[0]
    whole = num - num % SUM_RUN
    for start in range(0, whole, SUM_RUN):
        run = as_compute(0.0, like)
        run_weighted = as_compute(0.0, like)
        for j in range(SUM_RUN):
            centred = load_logit(segment[start + j], softcap) * scale - reference
            term = exp_for(centred, like)
            run += term
            run_weighted += term * (centred if centred > floor else floor)
        total += np.float64(run)
        weighted += np.float64(run_weighted)
    run = as_compute(0.0, like)
    run_weighted = as_compute(0.0, like)
    for j in range(whole, num):
        centred = load_logit(segment[j], softcap) * scale - reference
        term = exp_for(centred, like)
        run += term
        run_weighted += term * (centred if centred > floor else floor)
    return total + np.float64(run), weighted + np.float64(run_weighted)


@njit(cache=True, error_model="numpy")
def first_index_of(segment, value):
    """The first j with segment[j] == value (widened), or -1."""
    for j in range(segment.shape[0]):
        if to_compute(segment[j]) == value:
            return j
    return -1


@njit(cache=True, error_model="numpy")
def first_nan(row):
    """The first index of a NaN in the row, or -1."""
    for j in range(row.shape[0]):
        value = to_compute(row[j])
        if value != value:
            return j
    return -1


@njit(cache=True, error_model="numpy")
def row_stats(row, label, softcap, inv_temperature):
    """(m, S, T, z_y, raw max, argmax) of one row (see the module docstring and
    ``fastxent._token_range``), all but the argmax in float64; ``label`` < 0: z_y is 0. A row
    with a NaN has its first NaN as the argmax and NaN as the raw max."""
    like = row[0]
    scale = as_compute(inv_temperature, like)
    width = row.shape[0]
    running_raw = as_compute(-np.inf, like)
    running_max = -np.inf
    sum_exp = 0.0
    centred_sum = 0.0
    argmax = 0
    for block_lo in range(0, width, BLOCK):
        block_hi = min(block_lo + BLOCK, width)
        segment = row[block_lo:block_hi]
        block_raw = segment_max(segment, None)
        # Strictly larger: on a tie the earlier block keeps the argmax. The first block always
        # sets the max: with a softcap even a -inf logit has a finite z.
        if block_raw > running_raw or block_lo == 0:
            argmax = block_lo + max(first_index_of(segment, block_raw), 0)
            running_raw = block_raw
            new_max = np.float64(load_logit(block_raw, softcap) * scale)
            if sum_exp != 0.0:
                factor = rescale_factor(running_max, new_max)
                centred_sum = factor * (centred_sum + (running_max - new_max) * sum_exp)
                sum_exp *= factor
            running_max = new_max
        # While the max is -inf every value is -inf (or NaN): sums relative to 0 stay 0.
        reference = as_compute(running_max if running_max > -np.inf else 0.0, like)
        block_sum, block_centred = segment_entropy_sums(segment, reference, softcap, inv_temperature)
        sum_exp += block_sum
        centred_sum += block_centred
    raw_max = np.float64(running_raw)
    if sum_exp != sum_exp:
        nan_at = first_nan(row)
        if nan_at >= 0:
            argmax = nan_at
            raw_max = np.nan
    target_value = 0.0
    if label >= 0:
        target_value = np.float64(load_logit(row[label], softcap) * scale)
    return running_max, sum_exp, centred_sum, target_value, raw_max, argmax


@njit(cache=True, error_model="numpy")
def stats_rows_at(i, rows, labels, softcap, inv_temperature, outputs, argmax):
    """Row i of ``stats_rows``."""
    row_max, sum_exp, centred_sum, target_value, raw_max, argmax[i] = row_stats(
        rows[i], labels[i], softcap, inv_temperature
    )
    outputs[0, i] = row_max
    outputs[1, i] = sum_exp
    outputs[2, i] = centred_sum
    outputs[3, i] = target_value
    outputs[4, i] = raw_max


@njit(parallel=True, cache=True, error_model="numpy")
def stats_rows(rows, labels, softcap, inv_temperature, outputs, argmax):
    """Row-parallel statistics of rows (N, C), C >= 1: ``outputs`` float64 (5, N) receives
    m, S, T, z_y (0 where the label is negative) and the raw max; ``argmax`` int64 (N,)."""
    for i in prange(rows.shape[0]):
        stats_rows_at(i, rows, labels, softcap, inv_temperature, outputs, argmax)


@njit(cache=True, error_model="numpy")
def stats_rows_serial(rows, labels, softcap, inv_temperature, outputs, argmax):
    """``stats_rows`` on the calling thread, for inputs too small to wake the others."""
    for i in range(rows.shape[0]):
        stats_rows_at(i, rows, labels, softcap, inv_temperature, outputs, argmax)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def range_grad(row_in, row_out, lo, hi, reference, prob_coef, entropy_coef, mean_shift, softcap, inv_temperature):
    """Write e^(z_j - m) (B (T/S - (z_j - m)) - A) dz_j/dx_j over [lo, hi), with
    A = a / (S temperature), B = b / (S temperature) (``prob_coef``, ``entropy_coef``); the
    target is written after. ``row_out``: the output row, or True to write over ``row_in``
    (see ``_kernels.grad_dest``)."""
    source = row_in[lo:hi]
    dest = grad_dest(source, row_out, lo, hi)
    like = source[0]
    floor = as_compute(CENTRED_FLOOR, like)
    scale = as_compute(inv_temperature, like)
    coef_a = as_compute(prob_coef, like)
    coef_b = as_compute(entropy_coef, like)
    mean = as_compute(mean_shift, like)
    ref = as_compute(reference, like)
    for j in range(source.shape[0]):
        raw = source[j]
        value = load_logit(raw, softcap)
        centred = value * scale - ref
        term = exp_for(centred, raw)
        grad = term * (coef_b * (mean - (centred if centred > floor else floor)) - coef_a)
        if softcap is not None:
            ratio = value / as_compute(softcap, raw)
            grad *= as_compute(1.0, raw) - ratio * ratio
        dest[j] = from_compute(grad, dest[0])


@njit(cache=True, error_model="numpy")
def target_grad(value, reference, log_sum, mean_shift, a, q, b, softcap, inv_temperature):
    """The whole gradient at the target from its (softcapped) logit ``value``, in float64:
    a - q p_y + b p_y (T/S - (z_y - m)), over the temperature, times the softcap's derivative."""
    centred = value * inv_temperature - reference
    prob = math.exp(centred - log_sum)
    grad = a - q * prob + b * prob * (mean_shift - max(centred, CENTRED_FLOOR))
    grad *= inv_temperature
    if softcap is not None:
        ratio = value / softcap
        grad *= 1.0 - ratio * ratio
    return grad


@njit(cache=True, error_model="numpy")
def grad_rows_at(
    i,
    rows,
    grad_out,
    labels,
    softcap,
    inv_temperature,
    row_max,
    sum_exp,
    centred_sum,
    grad_target,
    grad_prob,
    grad_entropy,
):
    row = rows[i]
    width = row.shape[0]
    dest_row = out_row(grad_out, i)
    dest = grad_dest(row, dest_row, 0, width)
    label = labels[i]
    if label == IGNORED:
        dest[:] = 0
        return
    a, q, b = grad_target[i], grad_prob[i], grad_entropy[i]
    reference = row_max[i] if row_max[i] > -np.inf else 0.0
    total = sum_exp[i]
    mean_shift = centred_sum[i] / total
    # Read before the sweep, which may write over it (in place).
    target_value = np.float64(load_logit(row[max(label, 0)], softcap))
    for block_lo in range(0, width, BLOCK):
        block_hi = min(block_lo + BLOCK, width)
        range_grad(
            row,
            dest_row,
            block_lo,
            block_hi,
            reference,
            q * inv_temperature / total,
            b * inv_temperature / total,
            mean_shift,
            softcap,
            inv_temperature,
        )
    if label >= 0:  # ELSEWHERE: the target lies in another class range
        value = target_grad(target_value, reference, math.log(total), mean_shift, a, q, b, softcap, inv_temperature)
        dest[label] = from_compute(as_compute(value, dest[0]), dest[0])


@njit(parallel=True, cache=True, error_model="numpy")
def grad_rows(
    rows,
    grad_out,
    labels,
    softcap,
    inv_temperature,
    row_max,
    sum_exp,
    centred_sum,
    grad_target,
    grad_prob,
    grad_entropy,
):
    """Row-parallel gradient of sum_i a_i logprob_i + b_i entropy_i + c_i lse_i w.r.t. rows
    (N, W) of a class range, given a (``grad_target``), q = a - c (``grad_prob``) and b per row
    (float64 (N,)), into ``grad_out`` ((N, W), or True: over ``rows``), from the statistics
    merged over the whole vocabulary. Labels are local to the range (``fastxent._range``): IGNORED rows
    get 0, ELSEWHERE rows no target term."""
    for i in prange(rows.shape[0]):
        grad_rows_at(
            i,
            rows,
            grad_out,
            labels,
            softcap,
            inv_temperature,
            row_max,
            sum_exp,
            centred_sum,
            grad_target,
            grad_prob,
            grad_entropy,
        )


@njit(cache=True, error_model="numpy")
def grad_rows_serial(
    rows,
    grad_out,
    labels,
    softcap,
    inv_temperature,
    row_max,
    sum_exp,
    centred_sum,
    grad_target,
    grad_prob,
    grad_entropy,
):
    """``grad_rows`` on the calling thread."""
    for i in range(rows.shape[0]):
        grad_rows_at(
            i,
            rows,
            grad_out,
            labels,
            softcap,
            inv_temperature,
            row_max,
            sum_exp,
            centred_sum,
            grad_target,
            grad_prob,
            grad_entropy,
        )
