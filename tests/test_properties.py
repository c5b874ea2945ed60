"""Properties that hold for any valid input, searched with hypothesis over shapes, dtypes and values.

Example counts are bounded and the deadline is off (a first call may compile a kernel variant), so
the file runs in seconds once the kernels are cached.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    FLOAT_DTYPES,
    KERNEL_PATHS,
    assert_grad_close,
    assert_loss_close,
    force_kernel_path,
    gradient_scale,
    tolerance,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastxent
from fastxent import reference

# Drawn logits may happen to look like a softmax output; the hint is not what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore:logits look like probabilities:UserWarning")

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)

dtypes = st.sampled_from(FLOAT_DTYPES)
paths = st.sampled_from(KERNEL_PATHS)
lead_shapes = hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4)
class_counts = st.one_of(st.integers(1, 40), st.sampled_from([2047, 2048, 2049, 5000]))


@st.composite
def problems(draw, *, with_options=True, values=None):
    """(logits, labels, options, kernel path) for a valid, finite input."""
    dtype = draw(dtypes)
    lead_shape = draw(lead_shapes)
    num_classes = draw(class_counts)
    shape = lead_shape + (num_classes,)
    if values is None:
        values = st.floats(-30, 30, width=32)
    logits = draw(hnp.arrays(np.float32, shape, elements=values)).astype(dtype)
    labels = draw(hnp.arrays(np.int64, lead_shape, elements=st.integers(0, num_classes - 1)))
    options = {}
    # Weights of zero or of a sensible size: a subnormal total weight makes "mean" divide by ~0.
    weights = st.one_of(st.just(0.0), st.floats(1e-3, 4.0))
    if with_options:
        if draw(st.booleans()):
            options["label_smoothing"] = draw(st.floats(0.0, 0.9))
        if draw(st.booleans()):
            options["class_weight"] = draw(hnp.arrays(np.float64, (num_classes,), elements=weights))
        if draw(st.booleans()):
            options["sample_weight"] = draw(hnp.arrays(np.float64, lead_shape, elements=weights))
        if draw(st.booleans()):
            options["z_loss"] = draw(st.floats(0.0, 1e-2))
        if draw(st.booleans()):
            options["softcap"] = draw(st.floats(1.0, 50.0))
    return logits, labels, options, draw(paths)


def run(path, function, *args, **kwargs):
    with pytest.MonkeyPatch.context() as patch:
        force_kernel_path(patch, path)
        return function(*args, **kwargs)


@PROPERTY_SETTINGS
@given(problems())
def test_loss_is_never_negative(problem):
    logits, labels, options, path = problem
    loss = run(path, fastxent.sparse_cross_entropy, logits, labels, reduction="none", **options)
    assert (loss >= 0).all(), loss[loss < 0]


@PROPERTY_SETTINGS
@given(problems(), st.sampled_from(fastxent.REDUCTIONS))
def test_matches_reference(problem, reduction):
    logits, labels, options, path = problem
    loss, grad = run(path, fastxent.sparse_cross_entropy_with_grad, logits, labels, reduction=reduction, **options)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **options)
    # Absolute errors are multiplied by class and sample weights (up to 4 each) and, with z-loss,
    # by 2 z lse (lse up to ~40 here).
    assert_loss_close(loss, ref_loss, logits.dtype, scale=16 * (1 + 100 * options.get("z_loss", 0)))
    assert_grad_close(grad, ref_grad, logits.dtype, scale=gradient_scale(labels, reduction=reduction, **options))


@PROPERTY_SETTINGS
@given(dtypes, lead_shapes, class_counts, st.floats(-100, 100, width=16), paths)
def test_uniform_logits_score_ln_c(dtype, lead_shape, num_classes, value, path):
    logits = np.full(lead_shape + (num_classes,), value, dtype=np.float32).astype(dtype)
    labels = np.zeros(lead_shape, dtype=np.int64) + (num_classes - 1) // 2
    loss, grad = run(path, fastxent.sparse_cross_entropy_with_grad, logits, labels, reduction="none")
    np.testing.assert_allclose(loss.astype(np.float64), math.log(num_classes), rtol=1e-6, atol=1e-6)
    # softmax is 1 / C everywhere: the gradient is 1/C, and 1/C - 1 at the label.
    expected = np.full(logits.shape, 1.0 / num_classes)
    np.put_along_axis(expected, labels[..., None], 1.0 / num_classes - 1.0, axis=-1)
    assert_grad_close(grad, expected, dtype, scale=1.0)


# Logits on a grid of eighths with |x| <= 16, shifted by whole numbers up to 8: every value and
# every shifted value is exact in all four dtypes (bfloat16 holds 8 significant bits).
eighths = st.integers(-128, 128).map(lambda m: m / 8)


@PROPERTY_SETTINGS
@given(problems(with_options=False, values=eighths), st.integers(-8, 8))
def test_shifting_a_row_leaves_the_loss_unchanged(problem, shift):
    logits, labels, _, path = problem
    shifted = (logits.astype(np.float64) + shift).astype(logits.dtype)
    assert np.array_equal(shifted.astype(np.float64) - shift, logits.astype(np.float64))
    loss, grad = run(path, fastxent.sparse_cross_entropy_with_grad, logits, labels, reduction="none")
    loss_shifted, grad_shifted = run(path, fastxent.sparse_cross_entropy_with_grad, shifted, labels, reduction="none")
    tol = tolerance(logits.dtype)
    np.testing.assert_allclose(loss_shifted, loss, rtol=tol.loss_rtol, atol=tol.loss_atol)
    assert_grad_close(grad_shifted, grad.astype(np.float64), logits.dtype, scale=1.0)


@PROPERTY_SETTINGS
@given(problems(with_options=False), st.sampled_from(fastxent.REDUCTIONS))
def test_gradient_rows_sum_to_zero(problem, reduction):
    logits, labels, _, path = problem
    _, grad = run(path, fastxent.sparse_cross_entropy_with_grad, logits, labels, reduction=reduction)
    grad64 = grad.astype(np.float64)
    row_sums = grad64.sum(axis=-1)
    # Each entry is rounded once to the storage type (half an ulp) after float32 compute, whose
    # error is relative to the terms softmax_j and 1 (times the reduction's factor), not to
    # their difference.
    tol = tolerance(logits.dtype)
    scale = gradient_scale(labels, reduction=reduction)
    bound = (
        tol.half_ulp * np.abs(grad64).sum(axis=-1) + 2 * tol.grad_atol * scale + logits.shape[-1] * tol.grad_atol_abs
    )
    assert (np.abs(row_sums) <= bound).all(), (row_sums, bound)
