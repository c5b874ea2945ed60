"""The half-precision kernel paths: the max over 16-bit keys of the stored bits, the exp for
half-precision inputs (``exp_half``), and the bfloat16 rounding of rows known to be finite.

Each is checked against what it replaces (the float32 max of the widened values, float64 exp,
ml_dtypes' rounding) over every bit pattern or a dense grid, and the whole call against the
float64 reference and the unfused computation in the same dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    BFLOAT16,
    LARGE_CLASS_COUNT,
    LOW_PRECISION_DTYPES,
    assert_at_least_naive_accuracy,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    gradient_scale,
    random_labels,
    random_logits,
)
from numba import njit
from test_parity import naive_in_dtype

import fastxent
from fastxent import reference
from fastxent.cpu import _kernels
from fastxent.cpu._bits import from_compute_finite
from fastxent.cpu._math import HALF_MIN_ARG, exp_half, exp_half_in_range
from fastxent.cpu.storage import storage_view


def every_bit_pattern(dtype) -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint16).view(dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_max_of_stored_bits_is_the_max_of_the_values(rng, dtype):
    """Every value, NaNs of both signs included, in random segments: the 16-bit key max gives
    what the float32 key max gives on the widened values (a NaN wins or loses alike)."""
    values = rng.permutation(every_bit_pattern(dtype))
    bounds = np.unique(np.r_[0, rng.integers(1, values.size, 600), values.size])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        segment = values[lo:hi]
        got = _kernels.segment_max(storage_view(segment), None)
        want = _kernels.segment_max(segment.astype(np.float32), None)
        assert np.isnan(got) == np.isnan(want), (lo, hi)
        if not np.isnan(want):
            assert got == want and np.float32(got).view(np.uint32) == np.float32(want).view(np.uint32)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_max_of_stored_bits_edges(dtype):
    big = 6e4 if np.dtype(dtype) == np.float16 else 1e30
    cases = {
        (-np.inf, -np.inf): -np.inf,
        (-big, -np.inf, -big): -big,
        (0.0, -0.0): 0.0,
        (-1.0, np.inf, 3.0): np.inf,
        (float(np.finfo(dtype).smallest_subnormal), -1.0): float(np.finfo(dtype).smallest_subnormal),
        (-float(np.finfo(dtype).smallest_subnormal), -1.0): -float(np.finfo(dtype).smallest_subnormal),
    }
    for row, want in cases.items():
        segment = np.array(row, dtype=dtype)
        assert _kernels.segment_max(storage_view(segment), None) == np.float32(np.array(want, dtype))
    assert np.isnan(_kernels.segment_max(storage_view(np.array([1.0, np.nan, 2.0], dtype=dtype)), None))


@njit(cache=False)
def _exp_half_of(x, out, in_range):
    for i in range(x.shape[0]):
        out[i] = exp_half_in_range(x[i]) if in_range else exp_half(x[i])


def exp_half_of(x, in_range=False) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _exp_half_of(x, out, in_range)
    return out


def test_exp_half_accuracy():
    """Relative error under 4e-6 over its whole range (every bfloat16 and float16 argument and
    a dense float32 grid), nearly unbiased (what the sum of exps, hence the loss, sees)."""
    halves = np.concatenate(
        [every_bit_pattern(BFLOAT16).astype(np.float32), every_bit_pattern(np.float16).astype(np.float32)]
    )
    grid = np.concatenate([np.linspace(-86.5, 0.0, 2_000_001, dtype=np.float32), halves])
    grid = grid[(grid >= -86.5) & (grid <= 0.0)]
    got = exp_half_of(grid).astype(np.float64)
    exact = np.exp(grid.astype(np.float64))
    relative = got / exact - 1.0
    assert np.abs(relative).max() < 4e-6
    assert abs(relative.mean()) < 1e-6
    # Without the mask, the same values inside the range.
    np.testing.assert_array_equal(exp_half_of(grid, in_range=True), got.astype(np.float32))
    # exp(0) is exactly 1: the max of a row contributes exactly 1 to its sum.
    assert exp_half_of([0.0, -0.0])[0] == 1.0 and exp_half_of([-0.0])[0] == 1.0


def test_exp_half_special_values():
    got = exp_half_of([-np.inf, -1e30, -1e6, -86.6, -200.0, np.nan])
    assert (got[:5] == 0.0).all()
    assert np.isnan(got[5])


@njit(cache=False)
def _round_finite(x, like, out):
    for i in range(x.shape[0]):
        out[i] = from_compute_finite(x[i], like)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_finite_rounding_matches_ml_dtypes(rng, dtype):
    """Round to nearest, ties to even, overflow to inf, subnormals: as NumPy / ml_dtypes."""
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly halfway for bfloat16
    values = np.concatenate([bits, ties]).view(np.float32)
    values = values[np.isfinite(values)]
    extra = np.array([3.4e38, -3.4e38, 65519.0, 65520.0, 1e-40, -1e-45, 0.0, -0.0, 2.0**-25], np.float32)
    values = np.concatenate([values, extra])
    stored = storage_view(np.zeros(1, dtype))
    out = np.empty(values.size, stored.dtype)
    with np.errstate(over="ignore"):
        _round_finite(values, stored[0], out)
        want = storage_view(values.astype(dtype))
    np.testing.assert_array_equal(out, want)


def subnormal_logits(rng, shape, dtype) -> np.ndarray:
    """Logits that are all subnormal in ``dtype`` (both signs), a few of them zero."""
    tiny = float(np.finfo(dtype).smallest_normal)
    return (rng.uniform(-1.0, 1.0, shape) * tiny).astype(dtype)


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_subnormal_logits(rng, kernel_path, dtype, inplace):
    logits = subnormal_logits(rng, (3, 4100), dtype)
    labels = random_labels(rng, (3,), 4100)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits.copy(), labels, reduction="none", inplace=inplace)
    for got in (loss, loss_g):
        assert_loss_close(got, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("options", ({}, {"class_weight": "random"}, {"softcap": 20.0}), ids=("plain", "cw", "cap"))
@pytest.mark.parametrize("scale", (3.0, 30.0))
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_wide_range_rows_as_accurate_as_naive(rng, kernel_path, dtype, scale, options):
    """A realistic vocabulary with logits spread so that exp's argument covers its whole range
    (scale 30: most terms below exp(-86), flushed to 0), against float64 and the unfused
    computation in the same dtype; the fast (finite, no class weights) and the guarded
    gradient sweeps both run."""
    num_classes = LARGE_CLASS_COUNT
    logits = random_logits(rng, (2, num_classes), dtype, scale=scale)
    if np.dtype(dtype) == np.float16:
        logits = np.clip(logits.astype(np.float32), -6e4, 6e4).astype(dtype)
    labels = random_labels(rng, (2,), num_classes)
    options = dict(options)
    if options.get("class_weight") == "random":
        options["class_weight"] = rng.uniform(0.5, 2.0, num_classes)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none", **options)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(
        logits.copy(), labels, reduction="none", inplace=True, **options
    )
    naive_loss, naive_grad = naive_in_dtype(logits, labels, reduction="none", **options)
    scale_of_grad = gradient_scale(labels, reduction="none", **options)
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype, scale=scale_of_grad)
    assert_at_least_naive_accuracy(loss, ref_loss, naive_loss, dtype, "loss")
    assert_at_least_naive_accuracy(grad, ref_grad, naive_grad, dtype, "grad", scale=scale_of_grad)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_nan_and_inf_rows_take_the_guarded_sweep(rng, kernel_path, dtype):
    """Rows whose max or sum is not finite keep NaN gradients NaN (never rounded to inf)."""
    num_classes = 3 * 2048 + 5
    logits = random_logits(rng, (4, num_classes), dtype)
    logits[0, 7] = np.nan
    logits[1, 9] = -np.nan
    logits[2, 11] = np.inf
    logits[3, :] = -np.inf
    labels = np.array([1, 2, 3, 4])
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits.copy(), labels, reduction="none", inplace=True)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    assert np.isnan(loss).all() and np.isnan(ref_loss).all()
    grad64 = grad.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(grad64), np.isnan(ref_grad))
    np.testing.assert_array_equal(np.isinf(grad64), np.isinf(ref_grad))


@pytest.mark.parametrize("spread", (HALF_MIN_ARG + 0.5, HALF_MIN_ARG - 0.5, HALF_MIN_ARG))
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_id)
def test_rows_at_the_edge_of_the_unmasked_exp(rng, kernel_path, dtype, spread):
    """Rows whose logits span just under, exactly and just over 86.5 below their max: inside,
    the sums and the gradient sweep drop exp's mask; the results agree with float64 either way
    (a term at exp(-86.5) = 2.6e-38 must stay a positive bfloat16 gradient or flush to 0 as the
    masked path does, never become garbage)."""
    num_classes = 3 * 2048 + 11
    logits = rng.uniform(spread, 0.0, (3, num_classes)).astype(dtype)
    logits[:, 5] = 0.0
    logits[:, -3] = spread  # the lowest logit, in the last (partial) block
    labels = random_labels(rng, (3,), num_classes)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits.copy(), labels, reduction="none", inplace=True)
    for got in (loss, loss_g):
        assert_loss_close(got, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)
    assert (grad.astype(np.float64)[:, -3] >= 0).all()
