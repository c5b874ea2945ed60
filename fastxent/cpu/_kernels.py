"""Numba kernels for the fused cross-entropy (private: the launchers in ``xent.py`` call these).

Everything is built on one primitive: the partial statistics of one row over a class range:

    row_max       max_c v_c                      (v = the logit after the optional softcap)
    sum_exp       sum_c exp(v_c - row_max)       (taken relative to 0 while row_max = -inf)
    weighted_sum  sum_c w_c v_c                  (only when label smoothing needs it)

Partials of disjoint ranges merge exactly (``merge_max_sum``): the split-row mode here and the
vocabulary-parallel path both rely on that. From the merged statistics a short per-row epilogue
(``row_epilogue``) gives the loss and three gradient coefficients, and one more sweep writes

    dlogits_j = (coef_p * exp(v_j - row_max) - coef_w * w_j - coef_t * [j = y]) * dv_j/dx_j

Probability inputs (``from_logits=False``) use the same epilogue with ``row_max = 0`` and
``sum_exp = sum_c clip(p_c)``: exactly Keras' ``log(clip(p))`` followed by a softmax.

Storage types: float32, float64, and half precision passed as raw bits (int16 = float16,
uint16 = bfloat16; see ``_bits.py``). Compute type: float32, or float64 for float64 input.
Block sums are float32 SIMD lanes; blocks are added in float64.

Indexing note: every inner loop runs over a slice with ``range(len)``. Numba then knows the
index is non-negative and drops its negative-index wraparound check, which otherwise stops
LLVM from vectorizing the loop (measured: 1.1 vs 0.27 ns per element for the exp-sum).

Caching note for developers: Numba's on-disk cache of these kernels is keyed on this file's
timestamp only. After editing ``_math.py`` or ``_bits.py``, touch this file (or delete
``__pycache__/*.nbi``/``*.nbc``), or stale compiled kernels are loaded.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from fastxent._range import IGNORED
from fastxent.cpu._bits import (
    as_compute,
    bits_from_f32,
    f32_from_bits,
    from_compute,
    from_compute_finite,
    from_order_key,
    half_from_order_key,
    half_order_key,
    max_int16,
    min_int16,
    order_key,
    to_compute,
)
from fastxent.cpu._constants import BLOCK, FASTMATH, PROB_EPS, PROB_ONE_MINUS_EPS, SUM_RUN
from fastxent.cpu._math import HALF_MIN_ARG, exp_for, exp_term, tanh_c

# Fast-math goes on the leaf loops only (segment_*, *_range_grad, prob_range_stats); the row
# and class-range drivers are compiled without it (see ``_constants.py`` for why).


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def load_logit(raw, softcap):
    """Widen one stored logit and apply the optional softcap s * tanh(x / s)."""
    value = to_compute(raw)
    if softcap is not None:
        cap = as_compute(softcap, raw)
        value = cap * tanh_c(value / cap)
    return value


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def clip_prob(raw):
    """Keras' clip of a probability to [eps, 1 - eps] in the compute type; NaN passes through."""
    value = to_compute(raw)
    low = as_compute(PROB_EPS, raw)
    high = as_compute(PROB_ONE_MINUS_EPS, raw)
    value = low if value < low else value
    return high if value > high else value


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def prob_inside(value, like):
    """Whether a probability lies in [eps, 1 - eps], where clip's derivative is 1 (bounds
    included, as TensorFlow's clip_by_value gradient); ``like`` picks the bounds' type."""
    return value >= as_compute(PROB_EPS, like) and value <= as_compute(PROB_ONE_MINUS_EPS, like)


def class_weight_range(class_weight, lo, hi):
    """class_weight[lo:hi], or None when there are no class weights (Python stub for Numba)."""
    return None if class_weight is None else class_weight[lo:hi]


@overload(class_weight_range, inline="always")
def _class_weight_range_overload(class_weight, lo, hi):
    if class_weight is None or class_weight == types.none:
        return lambda class_weight, lo, hi: None
    return lambda class_weight, lo, hi: class_weight[lo:hi]


def grad_dest(source, row_out, lo, hi):
    """Where a gradient sweep over [lo, hi) writes: ``row_out[lo:hi]``, or ``source`` itself
    (the input slice) when ``row_out`` is True (in place).

    In-place is signalled by the constant True rather than by passing the same array twice:
    two views of one buffer look independent to LLVM, which then guards the loop with a
    runtime overlap check that fails and runs the scalar fallback (measured 8x slower, even
    for two slices of one array taken in the same function). Writing through the very view
    that is read keeps the loop vectorized.
    """
    return source if row_out is True else row_out[lo:hi]


@overload(grad_dest, inline="always")
def _grad_dest_overload(source, row_out, lo, hi):
    if isinstance(row_out, types.Boolean):
        return lambda source, row_out, lo, hi: source
    return lambda source, row_out, lo, hi: row_out[lo:hi]


def weight_at(weights, j):
    """weights[j] as float64, or 1.0 when ``weights`` is None (Python stub for Numba)."""
    return 1.0 if weights is None else float(weights[j])


@overload(weight_at, inline="always")
def _weight_at_overload(weights, j):
    if weights is None or weights == types.none:
        return lambda weights, j: 1.0
    return lambda weights, j: np.float64(weights[j])


def stored_max(segment):
    """Max of a non-empty segment of stored logits (no softcap), in the compute type (stub)."""
    raise NotImplementedError("only callable from compiled code")


@overload(stored_max, inline="always")
def _stored_max_overload(segment):
    if segment.dtype in (types.int16, types.uint16):
        # Half precision: a max over the 16-bit order keys of the stored bits, widened once.
        def max_of_bits(segment):
            best = half_order_key(segment[0])
            for j in range(segment.shape[0]):
                best = max_int16(half_order_key(segment[j]), best)
            return to_compute(half_from_order_key(best, segment[0]))

        return max_of_bits

    def max_of_floats(segment):
        best = order_key(to_compute(segment[0]))
        for j in range(segment.shape[0]):
            key = order_key(to_compute(segment[j]))
            best = key if key > best else best
        return from_order_key(best)

    return max_of_floats


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_max(segment, softcap):
    """Max of the (softcapped) logits of a non-empty 1-D segment, via integer order keys.

    A positive NaN wins the max and a negative one loses it; either way the exp-sum turns
    the row into NaN, as the semantics require.
    """
    if softcap is None:
        return stored_max(segment)
    best = order_key(load_logit(segment[0], softcap))
    for j in range(segment.shape[0]):
        key = order_key(load_logit(segment[j], softcap))
        best = key if key > best else best
    return from_order_key(best)


def stored_min_max(segment):
    """(min, max) of a non-empty segment of half-precision logits over their 16-bit keys; for
    other types (-inf, max): the min only serves half precision's in-range exp (stub)."""
    raise NotImplementedError("only callable from compiled code")


@overload(stored_min_max, inline="always")
def _stored_min_max_overload(segment):
    if segment.dtype in (types.int16, types.uint16):
        # One more instruction per 16 logits than the max alone (vpminsw).
        def min_max_of_bits(segment):
            low = half_order_key(segment[0])
            high = low
            for j in range(segment.shape[0]):
                key = half_order_key(segment[j])
                low = min_int16(key, low)
                high = max_int16(key, high)
            return (
                to_compute(half_from_order_key(low, segment[0])),
                to_compute(half_from_order_key(high, segment[0])),
            )

        return min_max_of_bits
    return lambda segment: (as_compute(-np.inf, segment[0]), stored_max(segment))


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_min_max(segment, softcap):
    """(lowest, max) of the (softcapped) logits of a non-empty segment; lowest is -inf where
    it is not tracked (softcap, float32, float64). A negative NaN is the lowest."""
    if softcap is None:
        return stored_min_max(segment)
    return as_compute(-np.inf, segment[0]), segment_max(segment, softcap)


def keep_term(segment, keep, j, term):
    """Store exp term ``term`` of element j where the gradient will be written: nowhere when
    ``keep`` is None, over ``segment`` itself when it is True (in place: the very view that is
    read, see ``grad_dest``), else into the array ``keep`` (stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(keep_term, inline="always")
def _keep_term_overload(segment, keep, j, term):
    if keep is None or keep == types.none:
        return lambda segment, keep, j, term: None
    if isinstance(keep, types.Boolean):

        def over_segment(segment, keep, j, term):
            segment[j] = term

        return over_segment

    def into_keep(segment, keep, j, term):
        keep[j] = term

    return into_keep


def kept_part(keep, lo, hi):
    """``keep[lo:hi]`` for an array, ``keep`` itself for None and True (stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(kept_part, inline="always")
def _kept_part_overload(keep, lo, hi):
    if isinstance(keep, types.Array):
        return lambda keep, lo, hi: keep[lo:hi]
    return lambda keep, lo, hi: keep


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_sum_exp(segment, reference, softcap, in_range, keep):
    """sum_j exp(v_j - reference) over a segment; NaN anywhere gives NaN.

    Terms are summed in the compute type over runs of ``SUM_RUN`` elements and the runs in
    float64: a float32 sum over a whole block rounds the same way at every step when the terms
    are alike (one logit of 9 and 2046 zeros lost 3e-6 of the sum, 1.3e-5 of the loss; runs of
    256 keep it to 3e-7 at no measured cost, where float64 for every term costs the forward 70 %
    and runs of 64 cost it 20 %). ``in_range`` True (not None): every v_j - reference is known
    to be >= -86.5, so half precision may skip exp's mask (see ``exp_term``). ``keep``: where
    each term is also stored (see ``keep_term``; None: nowhere).
    """
    total = 0.0
    num = segment.shape[0]
    whole = num - num % SUM_RUN
    # Runs of a fixed length (a loop LLVM unrolls into vector lanes), then the tail.
    for start in range(0, whole, SUM_RUN):
        run = as_compute(0.0, segment[0])
        for j in range(SUM_RUN):
            term = exp_term(load_logit(segment[start + j], softcap) - reference, segment[0], in_range)
            keep_term(segment, keep, start + j, term)
            run += term
        total += np.float64(run)
    tail = as_compute(0.0, segment[0])
    for j in range(whole, num):
        term = exp_term(load_logit(segment[j], softcap) - reference, segment[0], in_range)
        keep_term(segment, keep, j, term)
        tail += term
    return total + np.float64(tail)


def sum_exp_and_ahead_min_max(segment, reference, in_range, ahead, keep):
    """(sum_j exp(segment_j - reference), lowest of ``ahead``, max of ``ahead``) for two blocks
    of exactly ``BLOCK`` stored logits, no softcap, each term also stored where ``keep`` says
    (``keep_term``); one loop for float32 (stub)."""
    raise NotImplementedError("only callable from compiled code")


@overload(sum_exp_and_ahead_min_max, inline="always")
def _sum_exp_and_ahead_min_max_overload(segment, reference, in_range, ahead, keep):
    # float32: the max of the next block is taken in the loop that sums this block's exps.
    # Alone, the max pass waits on memory and the exp pass on arithmetic, one after the other;
    # together the next block's loads are in flight while the exps are computed (forward at
    # 2048 x 128256, 2-core AVX2 machine: 83 -> 70 ms).
    # The others keep two loops. Half precision: beside float32's exp (8 lanes) its 16-bit keys
    # would take 8 lanes too instead of 16, and in L1 the fused loop took 15 % longer, which
    # cost what the overlap saved (bfloat16 forward 49 ms either way). float64: its exp is a
    # scalar libm call, which would make the max scalar too (forward 196 -> 217 ms at 512 rows).
    if segment.dtype != types.float32:

        def two_loops(segment, reference, in_range, ahead, keep):
            lowest, highest = stored_min_max(ahead)
            return segment_sum_exp(segment, reference, None, in_range, keep), lowest, highest

        return two_loops

    def fused_float32(segment, reference, in_range, ahead, keep):
        high = order_key(to_compute(ahead[0]))
        total = 0.0
        for start in range(0, BLOCK, SUM_RUN):
            part = segment[start : start + SUM_RUN]
            part_ahead = ahead[start : start + SUM_RUN]
            part_keep = kept_part(keep, start, start + SUM_RUN)
            run = as_compute(0.0, segment[0])
            for j in range(SUM_RUN):
                term = exp_term(to_compute(part[j]) - reference, segment[0], in_range)
                keep_term(part, part_keep, j, term)
                run += term
                key = order_key(to_compute(part_ahead[j]))
                high = key if key > high else high
            total += np.float64(run)
        return total, as_compute(-np.inf, segment[0]), from_order_key(high)

    return fused_float32


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_sum_exp_ahead(segment, reference, in_range, ahead, keep):
    """``segment_sum_exp`` of a full block (no softcap) and ``segment_min_max`` of the next full
    block ``ahead``: (sum, ahead's lowest, ahead's max); see ``sum_exp_and_ahead_min_max``."""
    return sum_exp_and_ahead_min_max(segment, reference, in_range, ahead, keep)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def segment_weighted_sum(segment, weights, softcap):
    """sum_j w_j v_j over a segment (w_j = 1 when ``weights`` is None), in float64."""
    total = 0.0
    if weights is None:
        for j in range(segment.shape[0]):
            total += load_logit(segment[j], softcap)
    else:
        for j in range(segment.shape[0]):
            total += weights[j] * load_logit(segment[j], softcap)
    return total


@njit(cache=True, error_model="numpy")
def rescale_factor(old_max, new_max):
    """Factor that moves a sum_exp taken relative to ``old_max`` to ``new_max`` (>= old_max).

    Equal maxima give exactly 1, so two all -inf partials (sums relative to 0) merge by
    addition instead of through exp(-inf + inf) = NaN.
    """
    if old_max == new_max:
        return 1.0
    return math.exp(np.float64(old_max) - np.float64(new_max))


@njit(cache=True, error_model="numpy")
def merge_max_sum(max_a, sum_a, max_b, sum_b):
    """Exact merge of two (row_max, sum_exp) partials of disjoint class ranges."""
    merged_max = max_a if max_a > max_b else max_b
    merged_sum = sum_a * rescale_factor(max_a, merged_max) + sum_b * rescale_factor(max_b, merged_max)
    return merged_max, merged_sum


@njit(cache=True, error_model="numpy")
def logit_range_stats(row, lo, hi, softcap, class_weight, want_weighted_sum, keep, references):
    """Partial statistics of row[lo:hi] for logit inputs: (row_max, sum_exp, weighted_sum,
    lowest), lowest being the smallest logit where tracked (half precision without softcap;
    -inf otherwise, which only loses the gradient sweep's in-range exp).

    ``class_weight`` is None or one weight per element of ``row`` (same positions).
    ``keep``: None, or where every term exp(v_j - m_b) is stored as well: True for over ``row``
    itself, or an output row (same positions as ``row``); m_b is the running max after block b,
    which goes into ``references[b]`` (blocks counted from ``lo``; -inf: the block's terms were
    taken relative to 0 and are 0 or NaN). See ``kept_exp_range_grad``.
    """
    running_max = as_compute(-np.inf, row[0])
    lowest = np.inf
    sum_exp = 0.0
    weighted_sum = 0.0
    block_min = block_max = as_compute(-np.inf, row[0])
    if hi > lo:
        block_min, block_max = segment_min_max(row[lo : min(lo + BLOCK, hi)], softcap)
    for block_lo in range(lo, hi, BLOCK):
        block_hi = min(block_lo + BLOCK, hi)
        segment = row[block_lo:block_hi]
        block_keep = kept_part(keep, block_lo, block_hi)
        new_max = block_max if block_max > running_max else running_max
        sum_exp *= rescale_factor(running_max, new_max)
        running_max = new_max
        if references is not None:
            references[(block_lo - lo) // BLOCK] = running_max
        # While the max is still -inf every value is -inf or NaN: summing relative to 0
        # keeps the partial at 0 (or NaN) instead of exp(-inf + inf) = NaN.
        reference = running_max if running_max > -np.inf else as_compute(0.0, row[0])
        # False for -inf, NaN and the untracked -inf of float32/float64.
        in_range = block_min - reference >= as_compute(HALF_MIN_ARG, row[0])
        if block_min < lowest:
            lowest = np.float64(block_min)
        # Before the sum: a kept term may overwrite the logit.
        if want_weighted_sum:
            weights = class_weight_range(class_weight, block_lo, block_hi)
            weighted_sum += segment_weighted_sum(segment, weights, softcap)
        ahead_hi = min(block_hi + BLOCK, hi)
        if softcap is None and block_hi - block_lo == BLOCK and ahead_hi - block_hi == BLOCK:
            # The next block's (lowest, max) come from the same loop as this block's sum.
            ahead = row[block_hi:ahead_hi]
            if in_range:
                block_sum, block_min, block_max = segment_sum_exp_ahead(segment, reference, True, ahead, block_keep)
            else:
                block_sum, block_min, block_max = segment_sum_exp_ahead(segment, reference, None, ahead, block_keep)
        else:
            if in_range:
                block_sum = segment_sum_exp(segment, reference, softcap, True, block_keep)
            else:
                block_sum = segment_sum_exp(segment, reference, softcap, None, block_keep)
            if ahead_hi > block_hi:
                block_min, block_max = segment_min_max(row[block_hi:ahead_hi], softcap)
        sum_exp += block_sum
    # A finite max's own term is exp(0) = 1, so sum_exp >= 1; but a softcapped logit is recomputed
    # in the sum pass and can round an ulp below the max, which gave a one-class row the loss -6e-8.
    # (0 is an all -inf range; NaN passes through.)
    if 0.0 < sum_exp < 1.0:
        sum_exp = 1.0
    return np.float64(running_max), sum_exp, weighted_sum, lowest


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def prob_range_stats(row, lo, hi, class_weight, want_weighted_sum):
    """Partial statistics of row[lo:hi] for probability inputs: (0, sum clip(p), sum w log clip(p), min p)."""
    segment = row[lo:hi]
    clipped_sum = as_compute(0.0, segment[0])
    smallest = order_key(to_compute(segment[0]))
    length = segment.shape[0]
    for j in range(length):
        key = order_key(to_compute(segment[j]))
        smallest = key if key < smallest else smallest
        clipped_sum += clip_prob(segment[j])
    weighted_log_sum = 0.0
    if want_weighted_sum:
        weights = class_weight_range(class_weight, lo, hi)
        for j in range(length):
            weighted_log_sum += weight_at(weights, j) * math.log(clip_prob(segment[j]))
    return 0.0, np.float64(clipped_sum), weighted_log_sum, np.float64(from_order_key(smallest))


@njit(cache=True, error_model="numpy")
def row_epilogue(
    row_max,
    sum_exp,
    target_value,
    weighted_sum,
    sample_weight,
    target_weight,
    class_weight_total,
    num_classes,
    smoothing,
    z_loss,
    grad_scale,
):
    """Loss and gradient coefficients of one row from its merged statistics (float64).

    target_value: v_y (logits) or log clip(p_y) (probabilities). Returns
    (loss, coef_p, coef_t, coef_w) with dL/dv_j = coef_p * exp(v_j - row_max) - coef_t [j=y]
    - coef_w w_j. ``grad_scale`` is the reduction's factor (1 / denominator, or 1).
    """
    log_sum = math.log(sum_exp)
    lse = row_max + log_sum
    # lse - v_y as (max - v_y) + log(sum): exact even for logits of magnitude 1e30.
    nll = (row_max - target_value) + log_sum
    target_part = (1.0 - smoothing) * target_weight
    loss = target_part * nll
    smooth_coef = 0.0
    if smoothing != 0.0:
        smooth_coef = smoothing / num_classes
        loss += smooth_coef * ((class_weight_total * row_max - weighted_sum) + class_weight_total * log_sum)
    if z_loss != 0.0:
        loss += z_loss * target_weight * lse * lse
    loss *= sample_weight
    row_scale = grad_scale * sample_weight
    coef_prob = row_scale * (target_part + smooth_coef * class_weight_total + 2.0 * z_loss * target_weight * lse)
    # softmax_j = exp(v_j - row_max) / sum_exp: fold 1 / sum_exp into the coefficient.
    return loss, coef_prob / sum_exp, row_scale * target_part, row_scale * smooth_coef


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def finite_grad(value, reference, prob_coef, weight_coef, softcap, like, in_range):
    """coef_p exp(v - reference) - coef_w, times dv/dx, for a (softcapped) logit ``value``
    (``in_range``: see ``segment_sum_exp``)."""
    grad = prob_coef * exp_term(value - reference, like, in_range) - weight_coef
    if softcap is not None:
        cap = as_compute(softcap, like)
        ratio = value / cap
        grad *= as_compute(1.0, like) - ratio * ratio
    return grad


def finite_grad_sweep(source, dest, row_out, reference, prob_coef, weight_coef, softcap, in_range):
    """The gradient sweep of a row known to give finite gradients (stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(finite_grad_sweep, inline="always")
def _finite_grad_sweep_overload(source, dest, row_out, reference, prob_coef, weight_coef, softcap, in_range):
    if source.dtype != types.uint16:

        def sweep(source, dest, row_out, reference, prob_coef, weight_coef, softcap, in_range):
            for j in range(source.shape[0]):
                raw = source[j]
                grad = finite_grad(
                    soft_value(to_compute(raw), softcap), reference, prob_coef, weight_coef, softcap, raw, in_range
                )
                dest[j] = from_compute_finite(grad, dest[0])

        return sweep

    # bfloat16: two logits per 32-bit word. Widening is a shift (the even element) and a mask
    # (the odd one), and the two rounded results merge back into one word with a shift and a
    # mask, where 16-bit lanes need a zero-extending load per 8 elements and a pack plus a
    # cross-lane permute per 16 to restore the order.
    def sweep_pairs(source, dest, row_out, reference, prob_coef, weight_coef, softcap, in_range):
        num = source.shape[0]
        pairs = num // 2
        words_in = source[: 2 * pairs].view(np.uint32)
        words_out = word_dest(words_in, dest, row_out, pairs)
        for k in range(pairs):
            word = words_in[k]
            even = soft_value(f32_from_bits(np.uint32(word << np.uint32(16))), softcap)
            odd = soft_value(f32_from_bits(np.uint32(word & np.uint32(0xFFFF0000))), softcap)
            even_bits = bfloat16_rounded_high(
                finite_grad(even, reference, prob_coef, weight_coef, softcap, source[0], in_range)
            )
            odd_bits = bfloat16_rounded_high(
                finite_grad(odd, reference, prob_coef, weight_coef, softcap, source[0], in_range)
            )
            words_out[k] = np.uint32(
                np.uint32(even_bits >> np.uint32(16)) | np.uint32(odd_bits & np.uint32(0xFFFF0000))
            )
        for j in range(2 * pairs, num):
            raw = source[j]
            grad = finite_grad(
                soft_value(to_compute(raw), softcap), reference, prob_coef, weight_coef, softcap, raw, in_range
            )
            dest[j] = from_compute_finite(grad, dest[0])

    return sweep_pairs


def word_dest(words_in, dest, row_out, pairs):
    """Where the paired bfloat16 sweep writes: ``words_in`` itself in place (the same view, see
    ``grad_dest``), else ``dest`` as 32-bit words (stub for Numba)."""
    raise NotImplementedError("only callable from compiled code")


@overload(word_dest, inline="always")
def _word_dest_overload(words_in, dest, row_out, pairs):
    if isinstance(row_out, types.Boolean):
        return lambda words_in, dest, row_out, pairs: words_in
    return lambda words_in, dest, row_out, pairs: dest[: 2 * pairs].view(np.uint32)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def soft_value(value, softcap):
    """The optional softcap s * tanh(x / s) of a widened logit (``load_logit`` after the
    widening; a compiled function of its own, where Numba prunes the None branch)."""
    if softcap is not None:
        cap = as_compute(softcap, value)
        value = cap * tanh_c(value / cap)
    return value


@njit(fastmath=FASTMATH, cache=True, error_model="numpy", inline="always")
def bfloat16_rounded_high(value):
    """A finite float32's bits with the bfloat16 rounding (to nearest, ties to even) applied:
    the high 16 bits are the bfloat16, the low 16 are left over."""
    bits = np.uint32(bits_from_f32(np.float32(value)))
    odd = np.uint32(np.uint32(bits >> np.uint32(16)) & np.uint32(1))
    return np.uint32(bits + np.uint32(0x7FFF) + odd)


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def logit_range_grad(row_in, row_out, lo, hi, row_max, coef_p, coef_w, class_weight, softcap, lowest):
    """Write (coef_p exp(v_j - row_max) - coef_w w_j) dv/dx over [lo, hi); the target is fixed after.

    ``row_out`` is the output row, or True to write over ``row_in`` (each element is read before
    it is written).
    """
    source = row_in[lo:hi]
    dest = grad_dest(source, row_out, lo, hi)
    weights = class_weight_range(class_weight, lo, hi)
    reference = as_compute(row_max if row_max > -np.inf else 0.0, row_in[0])
    prob_coef = as_compute(coef_p, row_in[0])
    weight_coef = as_compute(coef_w, row_in[0])
    # A finite max and finite coefficients mean the row holds no NaN and no +inf (either would
    # have made the max or the sum NaN or infinite), so without class weights every gradient is
    # finite and may be rounded without a NaN guard (cheaper for bfloat16).
    if weights is None and abs(row_max) < np.inf and abs(coef_p) < np.inf and abs(coef_w) < np.inf:
        # ``lowest`` (the range's smallest logit, or -inf) within 86.5 of the max: no exp mask.
        if lowest - row_max >= HALF_MIN_ARG:
            finite_grad_sweep(source, dest, row_out, reference, prob_coef, weight_coef, softcap, True)
        else:
            finite_grad_sweep(source, dest, row_out, reference, prob_coef, weight_coef, softcap, None)
        return
    for j in range(source.shape[0]):
        raw = source[j]
        value = load_logit(raw, softcap)
        weight = as_compute(weight_at(weights, j), raw)
        grad = prob_coef * exp_for(value - reference, raw) - weight_coef * weight
        if softcap is not None:
            cap = as_compute(softcap, raw)
            ratio = value / cap
            grad *= as_compute(1.0, raw) - ratio * ratio
        dest[j] = from_compute(grad, dest[0])


@njit(cache=True, error_model="numpy")
def logit_target_grad(value, row_max, coef_p, coef_t, coef_w, target_weight_w, softcap):
    """The gradient at the target class from its (softcapped) logit ``value``, in float64.

    Computed apart from the sweep so softmax_y - 1 is formed in float64 and rounded once.
    """
    reference = row_max if row_max > -np.inf else 0.0
    grad = coef_p * math.exp(value - reference) - coef_t - coef_w * target_weight_w
    if softcap is not None:
        ratio = value / softcap
        grad *= 1.0 - ratio * ratio
    return grad


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def kept_exp_range_grad(row_in, row_out, lo, hi, references, row_max, coef_p, coef_w, class_weight):
    """Write coef_p exp(v_j - row_max) - coef_w w_j over [lo, hi) (float32 or float64, no
    softcap) from the terms exp(v_j - m_b) that ``logit_range_stats`` kept there, m_b being
    ``references[b]``: one multiply-add per element, where ``logit_range_grad`` computes an exp.
    The target is fixed after.

    A block kept while the running max was -inf holds 0 or NaN, and its factor is 0, so that
    0 * exp(0 - row_max) cannot overflow. Non-finite coefficients (a row with NaN, +inf, or
    only -inf) make every element NaN, as in ``logit_range_grad``.
    """
    reference = row_max if row_max > -np.inf else 0.0
    weight_coef = as_compute(coef_w, row_in[0])
    for block_lo in range(lo, hi, BLOCK):
        block_hi = min(block_lo + BLOCK, hi)
        block_max = references[(block_lo - lo) // BLOCK]
        shift = rescale_factor(block_max, reference) if block_max > -np.inf else 0.0
        factor = as_compute(coef_p * shift, row_in[0])
        terms = grad_dest(row_in[block_lo:block_hi], row_out, block_lo, block_hi)
        weights = class_weight_range(class_weight, block_lo, block_hi)
        for j in range(terms.shape[0]):
            terms[j] = factor * terms[j] - weight_coef * as_compute(weight_at(weights, j), terms[0])


@njit(fastmath=FASTMATH, cache=True, error_model="numpy")
def prob_range_grad(row_in, row_out, lo, hi, coef_p, coef_w, class_weight):
    """Write inside_j (coef_p - coef_w w_j / clip(p_j)) over [lo, hi); the target is fixed after.

    This is d/dp of the softmax loss on log(clip(p)): d log clip(p_j) / dp_j = inside_j / clip(p_j),
    and clip's derivative is 1 inside [eps, 1 - eps] (bounds included, as TensorFlow's) and 0 outside.
    """
    source = row_in[lo:hi]
    dest = grad_dest(source, row_out, lo, hi)
    weights = class_weight_range(class_weight, lo, hi)
    prob_coef = as_compute(coef_p, row_in[0])
    weight_coef = as_compute(coef_w, row_in[0])
    for j in range(source.shape[0]):
        raw = to_compute(source[j])
        clipped = clip_prob(source[j])
        weight = as_compute(weight_at(weights, j), source[j])
        inside = prob_inside(raw, source[j])
        grad = prob_coef - weight_coef * weight / clipped
        dest[j] = from_compute(grad if inside else as_compute(0.0, source[j]), dest[0])


@njit(cache=True, error_model="numpy")
def prob_target_grad_of(probability, like, coef_p, coef_t, coef_w, target_weight_w):
    """Gradient w.r.t. the target probability (its input value as float64), in float64.

    ``like`` is an element of the input, so the clip bounds have the input's precision.
    """
    if not prob_inside(as_compute(probability, like), like):
        return 0.0
    return coef_p - (coef_t + coef_w * target_weight_w) / probability


# ----------------------------------------------------------------------------------------
# Row drivers: one task per row. Each row is swept once for its statistics (block by block,
# so each block is read from memory once), then once more for the gradient while the row is
# still warm in L2.
# ----------------------------------------------------------------------------------------


def out_row(grad_out, i):
    """Row i of the gradient buffer, True (in place) when ``grad_out`` is True, None (no
    gradient) when it is None (stub)."""
    if grad_out is None or grad_out is True:
        return grad_out
    return grad_out[i]


@overload(out_row, inline="always")
def _out_row_overload(grad_out, i):
    if grad_out is None or grad_out == types.none:
        return lambda grad_out, i: None
    if isinstance(grad_out, types.Boolean):
        return lambda grad_out, i: True
    return lambda grad_out, i: grad_out[i]


def logit_row(
    row_in,
    row_out,
    label,
    sample_weight,
    class_weight,
    class_weight_total,
    num_classes,
    smoothing,
    z_loss,
    softcap,
    grad_scale,
):
    """Loss of one row of logits; writes its gradient into ``row_out`` (True: over ``row_in``).

    ``row_out`` None: loss only. Two schedules, chosen by type (``row_driver``): in general a
    statistics pass, then a gradient sweep that computes every exp again; for a float32 or
    float64 gradient without softcap, the statistics pass stores each exp where the gradient
    goes and the gradient pass only rescales them (``kept_exp_range_grad``) (stub for Numba).
    """
    raise NotImplementedError("only callable from compiled code")


def row_driver(keeps_exps):
    """``logit_row``'s implementation for one schedule (``keeps_exps`` is a compile-time
    constant of the closure: Numba prunes the other schedule's branches before typing)."""

    def row(
        row_in,
        row_out,
        label,
        sample_weight,
        class_weight,
        class_weight_total,
        num_classes,
        smoothing,
        z_loss,
        softcap,
        grad_scale,
    ):
        width = row_in.shape[0]
        # Read the target first: the statistics pass may overwrite it with kept exps, and the
        # sweep with the gradient (in place).
        target_value = np.float64(load_logit(row_in[label], softcap))
        target_weight = weight_at(class_weight, label)
        if keeps_exps:
            references = np.empty((width + BLOCK - 1) // BLOCK)
            row_max, sum_exp, weighted_sum, lowest = logit_range_stats(
                row_in, 0, width, softcap, class_weight, smoothing != 0.0, row_out, references
            )
        else:
            row_max, sum_exp, weighted_sum, lowest = logit_range_stats(
                row_in, 0, width, softcap, class_weight, smoothing != 0.0, None, None
            )
        loss, coef_p, coef_t, coef_w = row_epilogue(
            row_max,
            sum_exp,
            target_value,
            weighted_sum,
            sample_weight,
            target_weight,
            class_weight_total,
            num_classes,
            smoothing,
            z_loss,
            grad_scale,
        )
        if row_out is not None:
            if keeps_exps:
                kept_exp_range_grad(row_in, row_out, 0, width, references, row_max, coef_p, coef_w, class_weight)
            else:
                logit_range_grad(row_in, row_out, 0, width, row_max, coef_p, coef_w, class_weight, softcap, lowest)
            target_grad = logit_target_grad(target_value, row_max, coef_p, coef_t, coef_w, target_weight, softcap)
            dest = grad_dest(row_in, row_out, 0, width)
            dest[label] = from_compute(as_compute(target_grad, dest[0]), dest[0])
        return loss

    return row


_ROW_WITH_SWEEP = row_driver(False)
_ROW_WITH_KEPT_EXPS = row_driver(True)


@overload(logit_row)
def _logit_row_overload(
    row_in,
    row_out,
    label,
    sample_weight,
    class_weight,
    class_weight_total,
    num_classes,
    smoothing,
    z_loss,
    softcap,
    grad_scale,
):
    # Not inlined at the IR level: the row drivers are compiled without fast-math.
    gradient = not (row_out is None or row_out == types.none)
    no_softcap = softcap is None or softcap == types.none
    if gradient and no_softcap and row_in.dtype in (types.float32, types.float64):
        return _ROW_WITH_KEPT_EXPS
    return _ROW_WITH_SWEEP


@njit(cache=True, error_model="numpy")
def logit_rows_at(
    i,
    logits,
    grad_out,
    labels,
    sample_weight,
    class_weight,
    class_weight_total,
    smoothing,
    z_loss,
    softcap,
    grad_scale,
    loss_out,
):
    """Row i of ``logit_rows``: its loss, and its gradient into ``grad_out`` (True: over the
    logits; None: no gradient). An ignored row gets loss 0 and gradient 0."""
    label = labels[i]
    row = logits[i]
    if label < 0:
        loss_out[i] = 0.0
        if grad_out is not None:
            grad_dest(row, out_row(grad_out, i), 0, row.shape[0])[:] = 0
        return
    loss_out[i] = logit_row(
        row,
        out_row(grad_out, i),
        label,
        sample_weight[i],
        class_weight,
        class_weight_total,
        logits.shape[1],
        smoothing,
        z_loss,
        softcap,
        grad_scale,
    )


@njit(parallel=True, cache=True, error_model="numpy")
def logit_rows(
    logits,
    grad_out,
    labels,
    sample_weight,
    class_weight,
    class_weight_total,
    smoothing,
    z_loss,
    softcap,
    grad_scale,
    loss_out,
):
    """Row-parallel loss and gradient for logits (N, C): ``grad_out`` an (N, C) buffer, True
    to write over the logits (see ``grad_dest``), or None for the loss alone.

    labels: int64 (N,), -1 marks an ignored row (loss 0, gradient 0). sample_weight: float64 (N,).
    """
    for i in prange(logits.shape[0]):
        logit_rows_at(
            i,
            logits,
            grad_out,
            labels,
            sample_weight,
            class_weight,
            class_weight_total,
            smoothing,
            z_loss,
            softcap,
            grad_scale,
            loss_out,
        )


@njit(cache=True, error_model="numpy")
def logit_rows_serial(
    logits,
    grad_out,
    labels,
    sample_weight,
    class_weight,
    class_weight_total,
    smoothing,
    z_loss,
    softcap,
    grad_scale,
    loss_out,
):
    """``logit_rows`` on the calling thread, for inputs too small to pay for waking the others."""
    for i in range(logits.shape[0]):
        logit_rows_at(
            i,
            logits,
            grad_out,
            labels,
            sample_weight,
            class_weight,
            class_weight_total,
            smoothing,
            z_loss,
            softcap,
            grad_scale,
            loss_out,
        )


@njit(parallel=True, cache=True, error_model="numpy")
def prob_rows(
    probs,
    grad_out,
    labels,
    sample_weight,
    class_weight,
    class_weight_total,
    smoothing,
    z_loss,
    grad_scale,
    loss_out,
    row_min_out,
):
    """Row-parallel loss (and gradient unless ``grad_out`` is None) for probabilities (N, C).

    row_min_out receives each row's smallest input so the caller can reject negative values.
    """
    num_rows, num_classes = probs.shape
    for i in prange(num_rows):
        label = labels[i]
        row = probs[i]
        row_min_out[i] = 0.0
        if label < 0:
            loss_out[i] = 0.0
            if grad_out is not None:
                grad_out[i, :] = 0
            continue
        _, clipped_sum, weighted_log_sum, smallest = prob_range_stats(
            row, 0, num_classes, class_weight, smoothing != 0.0
        )
        row_min_out[i] = smallest
        target_raw = row[label]
        target_value = math.log(clip_prob(target_raw))
        target_weight = weight_at(class_weight, label)
        loss, coef_p, coef_t, coef_w = row_epilogue(
            0.0,
            clipped_sum,
            target_value,
            weighted_log_sum,
            sample_weight[i],
            target_weight,
            class_weight_total,
            num_classes,
            smoothing,
            z_loss,
            grad_scale,
        )
        loss_out[i] = loss
        if grad_out is not None:
            row_out = grad_out[i]
            prob_range_grad(row, row_out, 0, num_classes, coef_p, coef_w, class_weight)
            target_grad = prob_target_grad_of(
                np.float64(to_compute(target_raw)), target_raw, coef_p, coef_t, coef_w, target_weight
            )
            row_out[label] = from_compute(as_compute(target_grad, target_raw), row_out[0])


# ----------------------------------------------------------------------------------------
# Class-range drivers: statistics and gradients over parts of rows. Used for few long rows
# (each row cut into parts that threads take independently, merged exactly) and by the
# vocabulary-parallel path (one part per process, merged by collectives).
#
# Labels here are local to the class range: >= 0 is the target's position in the range,
# IGNORED marks a row that is not counted, ELSEWHERE a counted row whose target lies outside
# this range (in another process's shard).
# ----------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, error_model="numpy")
def parts_stats(
    rows,
    labels,
    part_bounds,
    from_probs,
    softcap,
    class_weight,
    want_weighted_sum,
    part_max,
    part_sum,
    part_weighted,
    part_min,
):
    """Partial statistics of every (row, part) of rows (N, W): outputs are (N, P) float64.

    part_bounds: int64 (P + 1,) offsets into the row. For probabilities part_max is 0,
    part_sum the clipped sum and part_min the smallest input; ignored rows get neutral values.
    """
    num_rows = rows.shape[0]
    num_parts = part_bounds.shape[0] - 1
    for task in prange(num_rows * num_parts):
        i = task // num_parts
        part = task - i * num_parts
        lo = part_bounds[part]
        hi = part_bounds[part + 1]
        part_min[i, part] = np.inf
        if labels[i] == IGNORED or hi <= lo:
            part_max[i, part] = -np.inf
            part_sum[i, part] = 0.0
            part_weighted[i, part] = 0.0
            continue
        if from_probs:
            row_max, sum_exp, weighted_sum, smallest = prob_range_stats(
                rows[i], lo, hi, class_weight, want_weighted_sum
            )
            part_min[i, part] = smallest
        else:
            row_max, sum_exp, weighted_sum, _ = logit_range_stats(
                rows[i], lo, hi, softcap, class_weight, want_weighted_sum, None, None
            )
        part_max[i, part] = row_max
        part_sum[i, part] = sum_exp
        part_weighted[i, part] = weighted_sum


@njit(parallel=True, cache=True, error_model="numpy")
def parts_grad(rows, grad_out, labels, part_bounds, from_probs, row_max, coef_p, coef_w, class_weight, softcap):
    """Gradient of every (row, part) without the target term (see ``targets_grad``).

    grad_out: (N, W) buffer, or True to write over ``rows``.
    """
    num_rows = rows.shape[0]
    num_parts = part_bounds.shape[0] - 1
    for task in prange(num_rows * num_parts):
        i = task // num_parts
        part = task - i * num_parts
        lo = part_bounds[part]
        hi = part_bounds[part + 1]
        if hi <= lo:
            continue
        dest_row = out_row(grad_out, i)
        if labels[i] == IGNORED:
            grad_dest(rows[i][lo:hi], dest_row, lo, hi)[:] = 0
        elif from_probs:
            prob_range_grad(rows[i], dest_row, lo, hi, coef_p[i], coef_w[i], class_weight)
        else:
            logit_range_grad(
                rows[i], dest_row, lo, hi, row_max[i], coef_p[i], coef_w[i], class_weight, softcap, -np.inf
            )


@njit(cache=True, error_model="numpy")
def targets_value(rows, labels, from_probs, softcap, target_value, target_input):
    """Per row with its target in range: v_y (logits) or log clip(p_y), and the raw input x_y.

    Rows without a target here get 0 in both, so partials of disjoint ranges add up.
    """
    for i in range(rows.shape[0]):
        label = labels[i]
        if label < 0:
            target_value[i] = 0.0
            target_input[i] = 0.0
            continue
        raw = rows[i, label]
        target_input[i] = np.float64(to_compute(raw))
        if from_probs:
            target_value[i] = math.log(clip_prob(raw))
        else:
            target_value[i] = np.float64(load_logit(raw, softcap))


@njit(cache=True, error_model="numpy")
def targets_grad(
    grad, labels, from_probs, target_value, target_input, target_weight, row_max, coef_p, coef_t, coef_w, softcap
):
    """Write the gradient at each row's target (when it is in range), in float64, rounded once."""
    for i in range(grad.shape[0]):
        label = labels[i]
        if label < 0:
            continue
        if from_probs:
            value = prob_target_grad_of(target_input[i], grad[0, 0], coef_p[i], coef_t[i], coef_w[i], target_weight[i])
        else:
            value = logit_target_grad(
                target_value[i], row_max[i], coef_p[i], coef_t[i], coef_w[i], target_weight[i], softcap
            )
        grad[i, label] = from_compute(as_compute(value, grad[0, 0]), grad[0, 0])


@njit(cache=True, error_model="numpy")
def epilogue_rows(
    row_max,
    sum_exp,
    target_value,
    weighted_sum,
    labels,
    sample_weight,
    target_weight,
    class_weight_total,
    num_classes,
    smoothing,
    z_loss,
    grad_scale,
    loss_out,
    coef_p,
    coef_t,
    coef_w,
):
    """``row_epilogue`` for every row from merged statistics; IGNORED rows get zeros."""
    for i in range(row_max.shape[0]):
        if labels[i] == IGNORED:
            loss_out[i] = 0.0
            coef_p[i] = 0.0
            coef_t[i] = 0.0
            coef_w[i] = 0.0
            continue
        loss, coef_p[i], coef_t[i], coef_w[i] = row_epilogue(
            row_max[i],
            sum_exp[i],
            target_value[i],
            weighted_sum[i],
            sample_weight[i],
            target_weight[i],
            class_weight_total,
            num_classes,
            smoothing,
            z_loss,
            grad_scale,
        )
        loss_out[i] = loss


@njit(cache=True, error_model="numpy")
def merge_parts(part_max, part_sum, row_max, sum_exp):
    """Exact merge of (N, P) partial (row_max, sum_exp) into per-row (N,) values."""
    for i in range(part_max.shape[0]):
        merged_max = part_max[i, 0]
        merged_sum = part_sum[i, 0]
        for part in range(1, part_max.shape[1]):
            merged_max, merged_sum = merge_max_sum(merged_max, merged_sum, part_max[i, part], part_sum[i, part])
        row_max[i] = merged_max
        sum_exp[i] = merged_sum
