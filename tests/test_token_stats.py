"""fastxent.token_stats / token_stats_with_grad on the CPU against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    BLOCK,
    FLOAT_DTYPES,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    loss_dtype_for,
    random_labels,
    random_logits,
)

import fastxent
from fastxent import reference

# One class, the scalar tail only, one block plus one (the running max moves between blocks),
# three blocks with a partial last one.
CLASS_COUNTS = (1, 7, BLOCK + 1, 3 * BLOCK - 5)
# (temperature, softcap): plain, a temperature alone, both (the softcap applies first).
TRANSFORMS = ((1.0, None), (0.7, None), (1.6, 4.0))


def _case(rng, num_rows, num_classes, dtype):
    """Logits with masked (-inf) classes, a row of ties for the max, an ignored row."""
    logits = random_logits(rng, (num_rows, num_classes), dtype)
    labels = random_labels(rng, (num_rows,), num_classes)
    if num_classes > 2:
        logits[0, rng.choice(num_classes, num_classes // 2, replace=False)] = -np.inf
        labels[0] = int(np.flatnonzero(np.isfinite(logits[0].astype(np.float64)))[0])
        # Ties: the same largest value early and late in the row (and in another block).
        top = np.max(logits[1].astype(np.float64)) + 1
        logits[1, [1, num_classes - 1]] = top
    labels[-1] = -100
    return logits, labels


def _grads(rng, num_rows):
    return rng.standard_normal(num_rows), rng.standard_normal(num_rows), rng.standard_normal(num_rows)


def _check_values(got, ref, dtype):
    assert isinstance(got, fastxent.TokenStats)
    for value, expected in zip(got[:3], ref[:3], strict=True):
        assert value.dtype == loss_dtype_for(dtype)
        assert_loss_close(value, expected, dtype)
    assert got.argmax.dtype == np.int64
    np.testing.assert_array_equal(got.argmax, ref[3])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_values_and_gradient_match_reference(rng, dtype, num_classes):
    num_rows = 5
    logits, labels = _case(rng, num_rows, num_classes, dtype)
    before = logits.copy()
    a, b, c = _grads(rng, num_rows)
    for temperature, softcap in TRANSFORMS:
        options = dict(temperature=temperature, softcap=softcap, ignore_index=-100)
        got, grad = fastxent.token_stats_with_grad(logits, labels, a, b, **options)
        ref, ref_grad = reference.token_stats_with_grad(logits, labels, a, b, **options)
        _check_values(got, ref, dtype)
        only = fastxent.token_stats(logits, labels, **options)
        for field, again in zip(got, only, strict=True):
            np.testing.assert_array_equal(field, again)
        assert grad.dtype == logits.dtype and grad.shape == logits.shape
        scale = (np.abs(a).max() + np.abs(b).max() * np.log(num_classes + 1)) / temperature
        assert_grad_close(grad, ref_grad, dtype, scale=scale)
        # Ignored row: logprob 0, entropy 0, gradient 0; its lse still computed.
        assert got.logprob[-1] == 0 and got.entropy[-1] == 0 and not grad[-1].astype(np.float64).any()
        assert np.isfinite(got.lse[-1])
        # With an lse gradient too (the ignored row's lse has one).
        _, grad = fastxent.token_stats_with_grad(logits, labels, a, b, c, **options)
        _, ref_grad = reference.token_stats_with_grad(logits, labels, a, b, c, **options)
        assert_grad_close(grad, ref_grad, dtype, scale=scale + np.abs(c).max() / temperature)
        assert grad[-1].astype(np.float64).any()
    np.testing.assert_array_equal(logits, before)


def test_entropy_and_logprob_definitions(rng):
    """The values mean what they say: entropy of a uniform row is log C, the logprob of a
    one-hot-like row's label ~0, and a temperature-scaled row equals the scaled logits."""
    num_classes = 5000
    uniform = np.zeros((1, num_classes), np.float32)
    stats = fastxent.token_stats(uniform, np.array([3]))
    np.testing.assert_allclose(stats.entropy, np.log(num_classes), rtol=1e-6)
    np.testing.assert_allclose(stats.logprob, -np.log(num_classes), rtol=1e-6)
    logits = random_logits(rng, (3, num_classes), np.float64)
    labels = random_labels(rng, (3,), num_classes)
    hot = fastxent.token_stats(logits, labels, temperature=0.5)
    scaled = fastxent.token_stats(logits * 2.0, labels)
    for x, y in zip(hot, scaled, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12)


def test_edges():
    inf, nan = np.inf, np.nan
    logits = np.array(
        [
            [1.0, 2.0, 2.0, -inf],  # tie for the max: the first index
            [-inf, -inf, -inf, -inf],  # nothing left: lse -inf, logprob and entropy NaN
            [0.0, nan, 3.0, nan],  # NaN: NaN values, argmax the first NaN
            [0.0, inf, 1.0, inf],  # +inf: NaN, argmax the first +inf
            [1e30, -1e30, 1e30, 0.0],  # huge: exact
            [5.0, -inf, 5.0, 2.0],  # the label is masked: logprob -inf, entropy finite
        ]
    )
    labels = np.array([0, 0, 2, 1, 2, 1])
    for dtype in (np.float32, np.float64):
        got = fastxent.token_stats(logits.astype(dtype), labels)
        ref = reference.token_stats(logits.astype(dtype), labels)
        np.testing.assert_array_equal(got.argmax, [1, 0, 1, 1, 0, 0])
        np.testing.assert_array_equal(got.argmax, ref[3])
        for value, expected in zip(got[:3], ref[:3], strict=True):
            np.testing.assert_allclose(value, expected, rtol=1e-6, equal_nan=True)
        assert got.lse[1] == -np.inf and np.isnan(got.logprob[1]) and np.isnan(got.entropy[1])
        assert np.isnan(got.logprob[2]) and np.isnan(got.lse[3])
        np.testing.assert_allclose(got.lse[4], 1e30 + np.log(2), rtol=1e-6)
        np.testing.assert_allclose(got.entropy[4], np.log(2), rtol=1e-6)
        assert got.logprob[5] == -np.inf and np.isfinite(got.entropy[5])
    # A softcap makes +inf finite (s tanh(inf) = s) and -inf too.
    capped = fastxent.token_stats(np.array([[np.inf, 0.0, -np.inf]]), np.array([2]), softcap=3.0)
    ref = reference.token_stats(np.array([[np.inf, 0.0, -np.inf]]), np.array([2]), softcap=3.0)
    for value, expected in zip(capped, ref, strict=True):
        np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_argmax_ties_across_blocks(rng):
    """The lowest index wins, whichever block holds the later copies."""
    logits = random_logits(rng, (3, 3 * BLOCK), np.float32)
    top = np.float32(50.0)
    logits[0, [BLOCK + 7, 2 * BLOCK + 1]] = top  # second and third block
    logits[1, [5, 6, 2 * BLOCK]] = top  # first block twice, then third
    logits[2, [3 * BLOCK - 1]] = top  # the very last class
    got = fastxent.token_stats(logits, np.zeros(3, np.int64))
    np.testing.assert_array_equal(got.argmax, [BLOCK + 7, 5, 3 * BLOCK - 1])


def test_shapes_axis_and_zero_rows(rng):
    logits = random_logits(rng, (2, 9, 3), np.float32)  # classes on axis 1
    labels = random_labels(rng, (2, 3), 9)
    got, grad = fastxent.token_stats_with_grad(logits, labels, 1.0, 0.5, axis=1)
    ref, ref_grad = reference.token_stats_with_grad(logits, labels, 1.0, 0.5, axis=1)
    assert got.logprob.shape == (2, 3) and grad.shape == logits.shape
    _check_values(got, ref, np.float32)
    assert_grad_close(grad, ref_grad, np.float32, scale=1.0)
    empty = fastxent.token_stats(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert all(value.shape == (0,) for value in empty)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=True), ValueError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        fastxent.token_stats(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), **options)


def test_bad_labels_and_shapes():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"label 3 at position \(1,\)"):
        fastxent.token_stats(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="labels shape"):
        fastxent.token_stats(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integers"):
        fastxent.token_stats(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="grad_entropy"):
        fastxent.token_stats_with_grad(logits, np.array([0, 1]), 1.0, np.ones(3))


# ----------------------------------------------------------------------------------------
# From hidden states: fastxent.linear_token_stats
# ----------------------------------------------------------------------------------------


def _linear_case(rng, dtype, num_rows=7, features=8, num_classes=3 * 256 + 5):
    hidden = (rng.standard_normal((num_rows, features)) * 0.7).astype(dtype)
    weight = rng.standard_normal((num_classes, features)).astype(dtype)
    bias = rng.standard_normal(num_classes).astype(dtype)
    bias[rng.choice(num_classes, 40, replace=False)] = -np.inf  # masked classes
    labels = random_labels(rng, (num_rows,), num_classes)
    labels[2] = -100
    labels[3] = int(np.flatnonzero(np.isfinite(bias.astype(np.float64)))[0])
    return hidden, weight, bias, labels


def _linear_logits(hidden, weight, bias):
    h, w = hidden.astype(np.float64), weight.astype(np.float64)
    return h @ w.T + bias.astype(np.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_linear_matches_reference_over_blocks(rng, dtype):
    """Blocks of 3 rows x 256 classes: every row's statistics merge across four class blocks
    and the argmax across them (a tie planted in two blocks keeps the lower index)."""
    from fastxent._linear_api import linear_token_stats_backward, linear_token_stats_forward

    hidden, weight, bias, labels = _linear_case(rng, dtype)
    # Row 0's largest logit, twice: classes 300 and 700 (second and third block).
    weight[700] = weight[300]
    bias[[300, 700]] = np.asarray(50.0, dtype)
    logits = _linear_logits(hidden, weight, bias)
    a, b, c = _grads(rng, hidden.shape[0])
    for temperature, softcap in TRANSFORMS:
        options = dict(temperature=temperature, softcap=softcap, ignore_index=-100)
        forward = linear_token_stats_forward(
            hidden, weight, labels, bias=bias, block_rows=3, block_classes=256, **options
        )
        ref, ref_grad = reference.token_stats_with_grad(logits, labels, a, b, c, **options)
        # The GEMM rounds the logits in the compute type: compare with float32's tolerance.
        tol_dtype = np.float64 if dtype == np.float64 else np.float32
        for value, expected in zip(forward.values[:3], ref[:3], strict=True):
            assert value.dtype == loss_dtype_for(dtype)
            assert_loss_close(value, expected, tol_dtype, scale=10.0)
        np.testing.assert_array_equal(forward.values.argmax, ref[3])
        assert forward.values.argmax[0] == 300
        again = fastxent.linear_token_stats(hidden, weight, labels, bias=bias, **options)
        np.testing.assert_allclose(again.lse, forward.values.lse, rtol=1e-6)
        grads = linear_token_stats_backward(hidden, weight, forward, a, b, c, bias=bias, memory_budget=3 * 800 * 8)
        h64, w64 = hidden.astype(np.float64), weight.astype(np.float64)
        expected = (ref_grad @ w64, ref_grad.T @ h64, ref_grad.sum(axis=0))
        for got, want in zip(grads, expected, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            size = np.abs(want).max()
            np.testing.assert_allclose(
                got.astype(np.float64),
                want,
                rtol=0,
                atol=size * (1e-9 if dtype == np.float64 else 1e-2 if dtype != np.float32 else 1e-5),
            )


def test_linear_skips_unwanted_grads_and_checks_input(rng):
    from fastxent._linear_api import linear_token_stats_backward, linear_token_stats_forward

    hidden, weight, bias, labels = _linear_case(rng, np.float32)
    labels[2] = 0
    forward = linear_token_stats_forward(hidden, weight, labels)
    grads = linear_token_stats_backward(hidden, weight, forward, 1.0, None, want_weight=False, want_bias=False)
    assert grads[1] is None and grads[2] is None and grads[0].shape == hidden.shape
    with pytest.raises(ValueError, match="weight"):
        fastxent.linear_token_stats(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="temperature"):
        fastxent.linear_token_stats(hidden, weight, labels, temperature=-1.0)
    with pytest.raises(ValueError, match="outside the valid range"):
        fastxent.linear_token_stats(hidden, weight, labels + weight.shape[0])
