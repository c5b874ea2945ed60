"""``out=``: the gradient written into a caller's buffer, identical to the allocating call."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLOAT_DTYPES, dtype_id, random_labels, random_logits, random_probabilities

import fastxent


@pytest.mark.parametrize("from_logits", (True, False), ids=("logits", "probabilities"))
@pytest.mark.parametrize("axis", (-1, 0))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_out_receives_the_same_gradient(rng, kernel_path, dtype, axis, from_logits):
    shape = (5, 3000)
    if from_logits:
        values = random_logits(rng, shape, dtype)
    else:
        values = random_probabilities(rng, shape, dtype)
    labels = random_labels(rng, (5,), 3000)
    if axis == 0:  # classes first: the rows of ``out`` are strided, written back by the API
        values = np.ascontiguousarray(values.T)
    before = values.copy()
    out = np.full_like(values, 7)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(
        values, labels, axis=axis, out=out, from_logits=from_logits, label_smoothing=0.1
    )
    expected_loss, expected_grad = fastxent.sparse_cross_entropy_with_grad(
        values, labels, axis=axis, from_logits=from_logits, label_smoothing=0.1
    )
    assert grad is out
    np.testing.assert_array_equal(out, expected_grad)
    assert loss == expected_loss
    np.testing.assert_array_equal(values, before)


def test_out_is_reused_across_calls(rng):
    out = np.empty((4, 2500), np.float32)
    for _ in range(3):
        logits = random_logits(rng, (4, 2500), np.float32)
        labels = random_labels(rng, (4,), 2500)
        _, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, out=out)
        np.testing.assert_array_equal(grad, fastxent.sparse_cross_entropy_with_grad(logits, labels)[1])


@pytest.mark.parametrize(
    "make_out, match",
    [
        (lambda x: np.zeros((2, 4), np.float32), "shape"),
        (lambda x: np.zeros((2, 3), np.float64), "dtype"),
        (lambda x: x, "overlaps the logits"),
        (lambda x: x[:, :], "overlaps the logits"),
        (lambda x: [[0.0] * 3] * 2, "out must be a ndarray"),
    ],
)
def test_bad_out_is_rejected_and_nothing_is_written(rng, make_out, match):
    logits = random_logits(rng, (2, 3), np.float32)
    before = logits.copy()
    with pytest.raises((ValueError, TypeError), match=match):
        fastxent.sparse_cross_entropy_with_grad(logits, np.array([0, 1]), out=make_out(logits))
    np.testing.assert_array_equal(logits, before)


def test_out_with_inplace_is_rejected(rng):
    logits = random_logits(rng, (2, 3), np.float32)
    with pytest.raises(ValueError, match="either inplace=True .* or out="):
        fastxent.sparse_cross_entropy_with_grad(logits, np.array([0, 1]), inplace=True, out=np.empty_like(logits))


def test_read_only_out_is_rejected(rng):
    logits = random_logits(rng, (2, 3), np.float32)
    out = np.empty_like(logits)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        fastxent.sparse_cross_entropy_with_grad(logits, np.array([0, 1]), out=out)
