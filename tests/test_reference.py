"""The float64 oracle (``fastxent.reference``) against a plain per-row Python loop.

The reference is vectorised NumPy; the loop below is written from SEMANTICS.md one row and one
class at a time with ``math`` on Python floats, and its gradient is taken by central finite
differences rather than by a formula. The two share no code, so the oracle cannot be wrong in
the same way as the kernels it judges.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    random_class_weight,
    random_labels,
    random_logits,
    random_probabilities,
    random_sample_weight,
    shape_id,
)

from fastxent import reference


def clip_bounds(dtype):
    """Keras clips with epsilon() = 1e-7 in the input's dtype: float64 bounds for float64 input,
    float32 bounds otherwise (half-precision inputs are clipped as float32)."""
    bound_type = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return float(bound_type(1e-7)), float(bound_type(1 - 1e-7))


NUM_CLASSES = 5
LEAD_SHAPES = ((), (4,), (2, 3))


def naive_values(row, from_logits, softcap, bounds):
    """The values the softmax sees: (softcapped) logits, or log of clipped probabilities."""
    if from_logits:
        return [x if softcap is None else softcap * math.tanh(x / softcap) for x in row]
    low, high = bounds
    return [p if math.isnan(p) else math.log(min(max(p, low), high)) for p in row]


def naive_log_softmax(values):
    """[v_c - lse] with SEMANTICS' edge rules: NaN or +inf anywhere, or every value -inf: NaN.

    Each entry is (v_c - max) - log(sum): exact for values of magnitude 1e30.
    """
    if any(math.isnan(v) or v == math.inf for v in values):
        return [math.nan] * len(values), math.nan
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return [math.nan] * len(values), math.nan
    top = max(finite)
    log_sum = math.log(sum(math.exp(v - top) for v in finite))
    return [(v - top) - log_sum for v in values], top + log_sum


def naive_row_loss(values, label, class_weight, smoothing, z_loss):
    """One row's loss before its sample weight (SEMANTICS' option table)."""
    num_classes = len(values)
    log_probs, lse = naive_log_softmax(values)
    loss = class_weight[label] * (1 - smoothing) * -log_probs[label]
    if smoothing:
        loss += smoothing * sum(class_weight[c] * -log_probs[c] for c in range(num_classes)) / num_classes
    if z_loss:
        loss += z_loss * class_weight[label] * lse * lse
    return loss


def naive_loss(
    logits,
    labels,
    *,
    from_logits=True,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
    class_weight=None,
    sample_weight=None,
    z_loss=0.0,
    softcap=None,
    axis=-1,
    input_dtype=None,
):
    """``input_dtype``: the dtype whose clip bounds apply (default: the logits' own)."""
    bounds = clip_bounds(np.asarray(logits).dtype if input_dtype is None else input_dtype)
    rows = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    lead_shape = rows.shape[:-1]
    num_classes = rows.shape[-1]
    rows = rows.reshape(-1, num_classes).tolist()
    flat_labels = np.asarray(labels).reshape(-1).tolist()
    weights = [1.0] * num_classes if class_weight is None else [float(w) for w in class_weight]
    samples = (
        [1.0] * len(rows)
        if sample_weight is None
        else np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), lead_shape).reshape(-1).tolist()
    )

    per_row, weight_total, counted = [], 0.0, 0
    for row, label, sample in zip(rows, flat_labels, samples, strict=True):
        if ignore_index is not None and label == ignore_index:
            per_row.append(0.0)
            continue
        values = naive_values(row, from_logits, softcap, bounds)
        per_row.append(sample * naive_row_loss(values, label, weights, label_smoothing, z_loss))
        weight_total += weights[label] * sample
        counted += 1

    if reduction == "none":
        return np.array(per_row, dtype=np.float64).reshape(lead_shape)
    total = math.fsum(per_row)
    if reduction == "sum":
        return np.float64(total)
    denominator = weight_total if reduction == "mean" else counted
    return np.float64(0.0 if denominator == 0 else total / denominator)


def finite_difference_grad(logits, labels, **options):
    """Central differences of the naive scalar loss (the sum of the rows for "none"), with one
    Richardson step so the error is O(step**4)."""
    x = np.asarray(logits, dtype=np.float64)
    input_dtype = np.asarray(logits).dtype

    def total(values):
        return math.fsum(np.ravel(naive_loss(values, labels, input_dtype=input_dtype, **options)).tolist())

    def central(index, step):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        return (total(plus) - total(minus)) / (2 * step)

    grad = np.empty_like(x)
    for index in np.ndindex(x.shape):
        # The step is relative to the entry and, for probabilities, to its distance from the
        # upper clip bound, so a probability stays on its side of both bounds; a zero stays
        # clipped and its derivative (zero, as TensorFlow's clip gives) is what is measured.
        reach, fraction = abs(x[index]), 1e-3
        if not options.get("from_logits", True):
            low, high = clip_bounds(input_dtype)
            reach = min(reach, abs(high - x[index]), abs(x[index] - low))
            # A probability's gradient is O(1) however small the entry, so a step relative to a
            # tiny entry would drown the difference in the rounding of the O(1) loss.
            fraction = 1e-2
        step = fraction * reach if reach != 0 else 1e-12
        grad[index] = (4 * central(index, step / 2) - central(index, step)) / 3
    return grad


def option_cases(rng, num_classes, lead_shape):
    return {
        "plain": {},
        "ignore_index": {"ignore_index": -100},
        "label_smoothing": {"label_smoothing": 0.2},
        "class_weight": {"class_weight": random_class_weight(rng, num_classes)},
        "sample_weight": {"sample_weight": random_sample_weight(rng, lead_shape)},
        "z_loss": {"z_loss": 1e-2},
        "softcap": {"softcap": 2.5},
        "smoothing_and_class_weight": {"label_smoothing": 0.1, "class_weight": random_class_weight(rng, num_classes)},
        "everything": {
            "ignore_index": 3,
            "label_smoothing": 0.15,
            "class_weight": random_class_weight(rng, num_classes),
            "sample_weight": random_sample_weight(rng, lead_shape),
            "z_loss": 1e-3,
            "softcap": 4.0,
        },
    }


OPTION_NAMES = (
    "plain",
    "ignore_index",
    "label_smoothing",
    "class_weight",
    "sample_weight",
    "z_loss",
    "softcap",
    "smoothing_and_class_weight",
    "everything",
)


def make_labels(rng, lead_shape, options):
    labels = random_labels(rng, lead_shape, NUM_CLASSES)
    if "ignore_index" in options and labels.size >= 2:
        flat = labels.reshape(-1)
        flat[0] = options["ignore_index"]
        if options["ignore_index"] >= 0:  # a valid class used as the ignored one
            flat[1:][flat[1:] == options["ignore_index"]] = (options["ignore_index"] + 1) % NUM_CLASSES
    return labels


def check_against_naive(logits, labels, **options):
    loss, grad = reference.sparse_cross_entropy_with_grad(logits, labels, **options)
    expected_loss = naive_loss(logits, labels, **options)
    assert loss.dtype == np.float64 and grad.dtype == np.float64
    assert loss.shape == np.shape(expected_loss)
    assert grad.shape == np.shape(logits)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-13)
    expected_grad = finite_difference_grad(logits, labels, **options)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(reference.sparse_cross_entropy(logits, labels, **options), loss)


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("lead_shape", LEAD_SHAPES, ids=shape_id)
def test_reference_logits_match_naive_loop(rng, lead_shape, option, reduction):
    options = option_cases(rng, NUM_CLASSES, lead_shape)[option]
    logits = random_logits(rng, lead_shape + (NUM_CLASSES,), np.float64)
    labels = make_labels(rng, lead_shape, options)
    check_against_naive(logits, labels, reduction=reduction, **options)


@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize(
    "option",
    (
        "plain",
        "ignore_index",
        "label_smoothing",
        "class_weight",
        "sample_weight",
        "z_loss",
        "smoothing_and_class_weight",
    ),
)
@pytest.mark.parametrize("dtype", (np.float64, np.float32), ids=("float64", "float32"))
def test_reference_probabilities_match_naive_loop(rng, dtype, option, reduction):
    lead_shape = (2, 3)
    options = option_cases(rng, NUM_CLASSES, lead_shape)[option]
    probs = random_probabilities(rng, lead_shape + (NUM_CLASSES,), dtype, zero_fraction=0.2)
    probs.reshape(-1, NUM_CLASSES)[0, 1] = 0.0  # at least one exact zero
    # Rows that do not sum to 1 are allowed (Keras normalises through the softmax).
    probs[0] *= 0.5
    # Finite differences need room to step without crossing the lower clip bound.
    low = clip_bounds(dtype)[0]
    probs[(probs > low / 2) & (probs < 4 * low)] = dtype(4 * low)
    labels = make_labels(rng, lead_shape, options)
    check_against_naive(probs, labels, from_logits=False, reduction=reduction, **options)


@pytest.mark.parametrize("axis", (0, 1, -3))
def test_reference_class_axis_matches_naive_loop(rng, axis):
    shape = [2, 3, 4]
    shape[axis] = NUM_CLASSES
    logits = random_logits(rng, tuple(shape), np.float64)
    lead_shape = tuple(np.delete(np.array(shape), axis % 3))
    labels = random_labels(rng, lead_shape, NUM_CLASSES)
    options = {"label_smoothing": 0.1, "sample_weight": random_sample_weight(rng, lead_shape)}
    for reduction in reference.REDUCTIONS:
        check_against_naive(logits, labels, reduction=reduction, axis=axis, **options)


def test_reference_sample_weight_broadcasts(rng):
    logits = random_logits(rng, (2, 3, NUM_CLASSES), np.float64)
    labels = random_labels(rng, (2, 3), NUM_CLASSES)
    column_weight = random_sample_weight(rng, (3,))
    loss = reference.sparse_cross_entropy(logits, labels, reduction="none", sample_weight=column_weight)
    full = naive_loss(logits, labels, reduction="none", sample_weight=np.tile(column_weight, (2, 1)))
    np.testing.assert_allclose(loss, full, rtol=1e-12)


def test_reference_edge_rows_match_naive_loop():
    inf, nan = np.inf, np.nan
    rows = np.array(
        [
            [-inf, 1.0, 2.0, -inf, 0.5],  # some -inf, target finite: finite
            [-inf, 1.0, 2.0, 3.0, 0.5],  # target -inf: +inf
            [-inf, -inf, -inf, -inf, -inf],  # all -inf: NaN
            [1.0, inf, 2.0, 0.0, 1.0],  # +inf: NaN
            [1.0, 2.0, nan, 0.5, 1.0],  # NaN: NaN
            [1e30, -1e30, 1e30, 3.0, -2.0],  # huge: finite and exact
            [1e30, -1e30, 1e30, 3.0, -2.0],  # huge, target far below the max
        ]
    )
    labels = np.array([1, 0, 2, 0, 1, 0, 1])
    loss = reference.sparse_cross_entropy(rows, labels, reduction="none")
    np.testing.assert_allclose(loss, naive_loss(rows, labels, reduction="none"), rtol=1e-15)
    assert np.isfinite(loss[0])
    assert loss[1] == np.inf
    assert np.isnan(loss[2:5]).all()
    np.testing.assert_allclose(loss[5], math.log(2.0), rtol=1e-15)
    assert loss[6] == 2e30


def test_reference_values_stated_in_semantics():
    # A uniform guess scores ln C (2.30 for 10 classes).
    uniform = np.full((3, 10), 0.7)
    np.testing.assert_allclose(
        reference.sparse_cross_entropy(uniform, np.array([0, 4, 9]), reduction="none"), np.log(10), rtol=1e-15
    )
    # A zero probability on the target gives 16.118 (Keras' epsilon 1e-7).
    probs = np.array([[0.0, 0.25, 0.75]])
    loss = reference.sparse_cross_entropy(probs, np.array([0]), from_logits=False, reduction="sum")
    assert round(float(loss), 3) == 16.118


def test_reference_reductions_with_nothing_counted(rng):
    logits = random_logits(rng, (4, NUM_CLASSES), np.float64)
    labels = np.full(4, -100)
    for reduction in ("sum", "mean", "sum_over_batch_size"):
        loss, grad = reference.sparse_cross_entropy_with_grad(logits, labels, ignore_index=-100, reduction=reduction)
        assert loss == 0.0 and not np.isnan(loss)
        assert not grad.any()
    loss, grad = reference.sparse_cross_entropy_with_grad(
        np.empty((0, NUM_CLASSES)), np.empty(0, np.int64), reduction="mean"
    )
    assert loss == 0.0 and grad.shape == (0, NUM_CLASSES)


def test_reference_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="'avg'"):
        reference.sparse_cross_entropy(np.zeros((1, 2)), np.array([0]), reduction="avg")
