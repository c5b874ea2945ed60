"""Dense targets (one-hot or soft rows): the fused kernel against the float64 reference, the
sparse path it must agree with for one-hot rows, edge values and user errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    BLOCK,
    FLOAT_DTYPES,
    REDUCTIONS,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    loss_dtype_for,
    random_class_weight,
    random_labels,
    random_logits,
    random_probabilities,
    random_sample_weight,
    shape_id,
    tolerance,
)

import fastxent
from fastxent import reference

# (lead shape, classes): a batch of short rows (only the scalar tail of the vector loops), a
# batch of sequences, and rows of two blocks (the running reference moves between blocks).
DENSE_CASES = (((5,), 7), ((3, 4), 33), ((3,), BLOCK + 5))


def random_targets(rng, shape, dtype, kind):
    """One-hot rows, or soft rows summing to 1 with some exact zeros."""
    if kind == "one_hot":
        labels = random_labels(rng, shape[:-1], shape[-1])
        return np.eye(shape[-1], dtype=dtype)[labels], labels
    return random_probabilities(rng, shape, dtype, zero_fraction=0.2), None


def options_for(rng, lead_shape, num_classes, kind):
    if kind == "plain":
        return {}
    return {
        "label_smoothing": float(rng.uniform(0.05, 0.3)),
        "class_weight": random_class_weight(rng, num_classes),
        "sample_weight": random_sample_weight(rng, lead_shape),
    }


def grad_scale_of(options, num_rows, reduction):
    """The natural size of one gradient entry (largest row weight over the divisor)."""
    weights = np.asarray(options.get("sample_weight", np.ones(num_rows)), np.float64).reshape(-1)
    largest = float(weights.max(initial=0.0)) * float(np.max(options.get("class_weight", [1.0])))
    divisor = {"mean": weights.sum(), "sum_over_batch_size": num_rows}.get(reduction, 1.0)
    return largest / divisor if divisor else 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda case: f"{shape_id(case[0])}-C{case[1]}")
@pytest.mark.parametrize("option_kind", ("plain", "weighted"))
def test_logits_match_reference(rng, dtype, case, option_kind):
    lead_shape, num_classes = case
    shape = lead_shape + (num_classes,)
    logits = random_logits(rng, shape, dtype)
    targets, _ = random_targets(rng, shape, dtype, "soft")
    options = options_for(rng, lead_shape, num_classes, option_kind)
    for reduction in REDUCTIONS:
        loss, grad = fastxent.categorical_cross_entropy_with_grad(logits, targets, reduction=reduction, **options)
        ref_loss, ref_grad = reference.categorical_cross_entropy_with_grad(
            logits, targets, reduction=reduction, **options
        )
        assert loss.dtype == loss_dtype_for(dtype)
        assert grad.dtype == logits.dtype and grad.shape == logits.shape
        # A sum of many rows has terms larger than the total's rounding suggests.
        assert_loss_close(loss, ref_loss, dtype, scale=float(np.prod(lead_shape)) if reduction == "sum" else 1.0)
        assert_grad_close(grad, ref_grad, dtype, scale=grad_scale_of(options, int(np.prod(lead_shape)), reduction))
        if dtype in (np.float32, np.float64):  # the loss-only kernel, compiled for these two only
            only_loss = fastxent.categorical_cross_entropy(logits, targets, reduction=reduction, **options)
            # Compiled separately, its sums may be vectorized in another order: rounding apart.
            assert_loss_close(
                only_loss, ref_loss, dtype, scale=float(np.prod(lead_shape)) if reduction == "sum" else 1.0
            )


@pytest.mark.parametrize("dtype", (np.dtype(np.float32), np.dtype(np.float64)), ids=dtype_id)
@pytest.mark.parametrize("option_kind", ("plain", "weighted"))
def test_probabilities_match_reference(rng, dtype, option_kind):
    lead_shape, num_classes = (6,), 9
    shape = lead_shape + (num_classes,)
    # Rows that do not sum to 1 exactly: Keras divides by the sum before clipping.
    probs = random_probabilities(rng, shape, dtype) * np.asarray(rng.uniform(0.5, 2.0, lead_shape + (1,)), dtype)
    targets, _ = random_targets(rng, shape, dtype, "soft")
    options = options_for(rng, lead_shape, num_classes, option_kind)
    for reduction in ("none", "mean"):
        loss, grad = fastxent.categorical_cross_entropy_with_grad(
            probs, targets, from_logits=False, reduction=reduction, **options
        )
        ref_loss, ref_grad = reference.categorical_cross_entropy_with_grad(
            probs, targets, from_logits=False, reduction=reduction, **options
        )
        assert_loss_close(loss, ref_loss, dtype)
        # 1 / clip(q) reaches 1e7 for clipped zeros: compare relative to the largest entry.
        tol = tolerance(dtype)
        np.testing.assert_allclose(
            grad.astype(np.float64), ref_grad, rtol=tol.grad_rtol, atol=tol.grad_rtol * float(np.abs(ref_grad).max())
        )


@pytest.mark.parametrize("dtype", (np.dtype(np.float32), np.dtype(np.float64)), ids=dtype_id)
def test_one_hot_equals_sparse(rng, dtype):
    """Sparse and dense cross-entropy are one function; only the label format differs."""
    lead_shape, num_classes = (4, 3), 50
    logits = random_logits(rng, lead_shape + (num_classes,), dtype)
    targets, labels = random_targets(rng, lead_shape + (num_classes,), dtype, "one_hot")
    options = options_for(rng, lead_shape, num_classes, "weighted")
    for reduction in ("none", "sum"):
        dense = fastxent.categorical_cross_entropy_with_grad(logits, targets, reduction=reduction, **options)
        sparse = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **options)
        assert_loss_close(dense[0], sparse[0], dtype, scale=12.0 if reduction == "sum" else 1.0)
        assert_grad_close(dense[1], sparse[1], dtype, scale=grad_scale_of(options, 12, reduction))
    # The references agree too, independently of the kernels.
    np.testing.assert_allclose(
        reference.categorical_cross_entropy(logits, targets, reduction="none", **options),
        reference.sparse_cross_entropy(logits, labels, reduction="none", **options),
        rtol=1e-12,
    )


def test_class_axis_and_integer_targets(rng):
    logits = random_logits(rng, (3, 6, 4), np.float32)  # classes on axis 1, as PyTorch's (N, C, d)
    labels = random_labels(rng, (3, 4), 6)
    one_hot = np.moveaxis(np.eye(6, dtype=np.int64)[labels], -1, 1)
    loss, grad = fastxent.categorical_cross_entropy_with_grad(logits, one_hot, axis=1, reduction="sum")
    ref_loss, ref_grad = reference.categorical_cross_entropy_with_grad(logits, one_hot, axis=1, reduction="sum")
    assert grad.shape == logits.shape
    assert_loss_close(loss, ref_loss, np.float32, scale=12.0)
    assert_grad_close(grad, ref_grad, np.float32, scale=1.0)


def test_edge_values():
    inf, nan = np.inf, np.nan
    logits = np.array(
        [
            [0.5, -inf, 1.0],  # -inf where the target is 0: that class simply has probability 0
            [-inf, 0.5, 1.0],  # -inf where the target has mass: +inf
            [-inf, -inf, -inf],  # no class has any probability: NaN
            [inf, 0.0, 1.0],  # +inf: NaN
            [nan, 0.0, 1.0],  # NaN: NaN
            [1e30, -1e30, 1e30 - 1e24],  # huge magnitudes: exact after subtracting the max
        ]
    )
    targets = np.array([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5], [1, 0, 0], [0, 0, 1], [0, 0, 1], [0.0, 0.0, 1.0]])
    loss, grad = fastxent.categorical_cross_entropy_with_grad(logits, targets, reduction="none")
    ref_loss, ref_grad = reference.categorical_cross_entropy_with_grad(logits, targets, reduction="none")
    expected_first = 0.5 * (np.logaddexp(0.5, 1.0) - 0.5) + 0.5 * (np.logaddexp(0.5, 1.0) - 1.0)
    np.testing.assert_allclose(loss[0], expected_first, rtol=1e-14)
    assert loss[1] == inf
    assert np.isnan(loss[2:5]).all()
    assert loss[5] == 1e30 - logits[5, 2]  # exactly the distance to the max; ~1e24
    np.testing.assert_array_equal(loss, ref_loss)
    np.testing.assert_allclose(grad[[0, 5]], ref_grad[[0, 5]], rtol=1e-12, atol=1e-15)
    assert grad[0, 1] == 0.0 and np.isnan(grad[2:5]).all()


def test_empty_and_zero_weights(rng):
    empty = np.zeros((0, 5), np.float32)
    assert fastxent.categorical_cross_entropy(empty, empty, reduction="none").shape == (0,)
    for reduction in ("sum", "mean", "sum_over_batch_size"):
        assert float(fastxent.categorical_cross_entropy(empty, empty, reduction=reduction)) == 0.0
    logits = random_logits(rng, (3, 5), np.float32)
    targets = random_probabilities(rng, (3, 5), np.float32)
    loss, grad = fastxent.categorical_cross_entropy_with_grad(logits, targets, sample_weight=np.zeros(3))
    assert float(loss) == 0.0 and not grad.any()


def test_errors(rng):
    logits = random_logits(rng, (4, 5), np.float32)
    targets = random_probabilities(rng, (4, 5), np.float32)
    with pytest.raises(ValueError, match="targets shape"):
        fastxent.categorical_cross_entropy(logits, targets[:, :4])
    with pytest.raises(ValueError, match="label_smoothing"):
        fastxent.categorical_cross_entropy(logits, targets, label_smoothing=1.0)
    with pytest.raises(ValueError, match="class_weight"):
        fastxent.categorical_cross_entropy(logits, targets, class_weight=np.ones(4))
    with pytest.raises(ValueError, match="sample_weight"):
        fastxent.categorical_cross_entropy(logits, targets, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        fastxent.categorical_cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(TypeError, match="targets must be numbers"):
        fastxent.categorical_cross_entropy(logits, np.full((4, 5), "a"))
    with pytest.raises(ValueError, match=r"negative value .* pass from_logits=True"):
        fastxent.categorical_cross_entropy(logits, targets, from_logits=False)


def test_tensorflow_style_gradient(rng):
    """The TensorFlow adapter's variant: softmax - targets, which is the derivative only for rows
    that sum to 1 (as TensorFlow's op returns it)."""
    from fastxent import _dense_api

    logits = random_logits(rng, (5, 8), np.float64)
    targets = random_probabilities(rng, (5, 8), np.float64) * rng.uniform(0.5, 2.0, (5, 1))
    options = dict(
        want_grad=True,
        from_logits=True,
        reduction="none",
        label_smoothing=0.0,
        class_weight=None,
        sample_weight=None,
        axis=-1,
    )
    loss, grad = _dense_api.run(logits, targets, unit_mass_grad=True, **options)
    exact_loss, exact_grad = _dense_api.run(logits, targets, **options)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_array_equal(loss, exact_loss)
    np.testing.assert_allclose(grad, softmax - targets, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(exact_grad, targets.sum(1, keepdims=True) * softmax - targets, rtol=1e-12, atol=1e-15)
    assert not np.allclose(grad, exact_grad)


@pytest.mark.parametrize("kind", ("target_at_max", "target_below"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_huge_logits(rng, dtype, kind):
    """Logits of magnitude 1e30 (6e4 for float16) over rows of three blocks, as for sparse labels
    (tests/test_edges.py): the loss is exact after subtracting the max, ln k for a target among
    k tied maxima. Guards the fast-math rule: no "reassoc" on the row drivers, whose
    distance + mass * log(sum_exp) it could regroup into something that cancels."""
    big = 6e4 if np.dtype(dtype) == np.float16 else 1e30
    num_classes = 2 * BLOCK + 7
    logits = random_logits(rng, (3, num_classes), dtype)
    labels = np.array([5, BLOCK + 3, num_classes - 2])
    for i, label in enumerate(labels):
        if kind == "target_at_max":
            logits[i] = np.where(rng.random(num_classes) < 0.5, -big, logits[i])
            logits[i, [1, label, BLOCK + 9]] = big  # a three-way tie at the max, in different blocks
        else:
            logits[i] = np.where(rng.random(num_classes) < 0.5, big, logits[i])
            logits[i, label] = -big
    targets = np.eye(num_classes, dtype=dtype)[labels]
    loss, grad = fastxent.categorical_cross_entropy_with_grad(logits, targets, reduction="none")
    ref_loss, ref_grad = reference.categorical_cross_entropy_with_grad(logits, targets, reduction="none")
    rows = logits.astype(np.float64)
    for i, label in enumerate(labels):
        top = rows[i].max()
        stated = (top - rows[i, label]) + np.log(np.count_nonzero(rows[i] == top))
        np.testing.assert_allclose(float(loss[i]), stated, rtol=1e-6)
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)
    # The sparse kernel gives the same rows the same loss.
    sparse = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    assert_loss_close(loss, sparse, dtype)
