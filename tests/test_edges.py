"""Every row of SEMANTICS.md's edge-value table, on both kernel paths, plus empty and all-ignored batches.

Edge rows sit in a batch of two next to an ordinary row, with C large enough that the split-row
path cuts each row into several parts: the special values are placed in different parts so that
the exact merge of partial statistics is exercised too, and the ordinary row shows that a bad row
does not leak into its neighbour.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    BLOCK,
    FLOAT_DTYPES,
    KERNEL_PATHS,
    LEAD_SHAPES,
    REDUCTIONS,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    force_kernel_path,
    loss_dtype_for,
    random_labels,
    random_logits,
    shape_id,
    split_part_count,
)

import fastxent
from fastxent import reference

NUM_CLASSES = 2 * BLOCK + 904  # three blocks: the split path cuts a row into 2 or 3 parts
TARGET = BLOCK + 17  # the edge row's label sits in the second part


def huge_value(dtype) -> float:
    """A huge finite logit the dtype can hold: 1e30, or 6e4 for float16 (its max is 65504)."""
    return 6e4 if np.dtype(dtype) == np.float16 else 1e30


def edge_row(kind, rng, dtype):
    """(row of NUM_CLASSES logits, label) for one row of the edge table."""
    row = random_logits(rng, (NUM_CLASSES,), dtype)
    label = TARGET
    if kind == "some_neg_inf":
        row[:BLOCK] = -np.inf  # a whole part of -inf (its partial max is -inf)
        row[rng.random(NUM_CLASSES) < 0.3] = -np.inf
        row[label] = 1.0
    elif kind == "target_neg_inf":
        row[label] = -np.inf
    elif kind == "all_neg_inf":
        row[:] = -np.inf
    elif kind == "pos_inf":
        row[-1] = np.inf  # in the last part; the target's part is finite
    elif kind == "pos_inf_target":
        row[label] = np.inf
    elif kind == "nan":
        row[5] = np.nan  # in the first part
    elif kind == "huge_target_at_max":
        big = huge_value(dtype)
        row[:] = np.where(rng.random(NUM_CLASSES) < 0.5, -big, row)
        row[[3, label, NUM_CLASSES - 1]] = big  # three-way tie at the max, one per part
    elif kind == "huge_target_below":
        big = huge_value(dtype)
        row[:] = np.where(rng.random(NUM_CLASSES) < 0.5, big, row)
        row[label] = -big
    else:
        raise ValueError(kind)
    return row, label


def expected_loss(kind, row, label):
    """What SEMANTICS says the edge row's loss is (None: finite, compared with the reference).

    The huge rows' exact values: k classes tie at the max M and every other class is at least
    M - 6e4 + 10, so lse = M + ln k to well under float32 precision.
    """
    row64 = np.asarray(row).astype(np.float64)
    if kind.startswith("huge"):
        top = row64.max()
        return (top - row64[label]) + math.log(np.count_nonzero(row64 == top))
    return {
        "some_neg_inf": None,
        "target_neg_inf": math.inf,
        "all_neg_inf": math.nan,
        "pos_inf": math.nan,
        "pos_inf_target": math.nan,
        "nan": math.nan,
    }[kind]


EDGE_KINDS = (
    "some_neg_inf",
    "target_neg_inf",
    "all_neg_inf",
    "pos_inf",
    "pos_inf_target",
    "nan",
    "huge_target_at_max",
    "huge_target_below",
)


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_edge_row(rng, kernel_path, dtype, kind):
    if kernel_path == "split":
        assert split_part_count(2, NUM_CLASSES) >= 2
    row, label = edge_row(kind, rng, dtype)
    logits = np.stack([row, random_logits(rng, (NUM_CLASSES,), dtype)])
    labels = np.array([label, rng.integers(NUM_CLASSES)])

    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits.copy(), labels, reduction="none", inplace=True)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    assert loss.dtype == loss_dtype_for(dtype)

    stated = expected_loss(kind, row, label)
    for got in (loss, loss_g):
        if stated is None:
            assert np.isfinite(got[0])
        elif math.isnan(stated):
            assert np.isnan(got[0])
        elif math.isinf(stated):
            assert got[0] == stated
        else:
            np.testing.assert_allclose(got[0], stated, rtol=1e-6)
        assert_loss_close(got, ref_loss, dtype)

    # The ordinary neighbour row is unaffected, loss and gradient.
    assert_grad_close(grad[1], ref_grad[1], dtype)
    if np.isfinite(ref_loss[0]) or kind == "target_neg_inf":
        assert_grad_close(grad[0], ref_grad[0], dtype)
    if kind == "some_neg_inf":
        # Classes at -inf have probability 0: their gradient is exactly 0.
        assert not grad[0][np.isneginf(logits[0])].astype(np.float64).any()
    if kind == "target_neg_inf":
        assert float(grad[0, label]) == -1.0

    # The bad row reaches the reduced loss (NaN stays NaN, +inf stays +inf).
    mean = fastxent.sparse_cross_entropy(logits, labels, reduction="mean")
    if np.isnan(ref_loss[0]):
        assert np.isnan(mean)
    elif np.isinf(ref_loss[0]):
        assert mean == np.inf
    else:
        assert_loss_close(mean, ref_loss.mean(), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_huge_logits_finite_and_exact_small_rows(kernel_path, dtype):
    """The SEMANTICS example on a short row: [M, M, -M, 3, -2] scores ln 2 for a max class."""
    logits = np.array([[huge_value(dtype), huge_value(dtype), -huge_value(dtype), 3.0, -2.0]] * 3, dtype=dtype)
    labels = np.array([0, 2, 3])
    top = float(logits[0, 0].astype(np.float64))
    expected = [math.log(2), 2 * top + math.log(2), (top - 3) + math.log(2)]
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    np.testing.assert_allclose(ref_loss, expected, rtol=1e-15)
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    for got in (loss, loss_g):
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=1e-6)
    assert_grad_close(grad, ref_grad, dtype)


# ----------------------------------------------------------------------------------------
# One class, no rows, nothing counted
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead_shape", LEAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_one_class(rng, kernel_path, dtype, lead_shape, reduction):
    logits = random_logits(rng, lead_shape + (1,), dtype)
    logits.reshape(-1)[0] = huge_value(dtype)
    labels = np.zeros(lead_shape, dtype=np.int64)
    for options in ({}, {"label_smoothing": 0.3}, {"softcap": 2.0}):
        loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **options)
        # log(1) = 0 whatever the logit (up to float32 compute error per row).
        assert loss.shape == (lead_shape if reduction == "none" else ())
        assert_loss_close(loss, np.zeros(loss.shape), dtype, scale=max(1, labels.size))
        np.testing.assert_allclose(grad.astype(np.float64), 0.0, atol=1e-6)
        assert grad.shape == logits.shape and grad.dtype == dtype


EMPTY_SHAPES = ((0,), (0, 3), (2, 0))


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead_shape", EMPTY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_zero_rows(kernel_path, dtype, lead_shape, reduction, inplace):
    logits = np.empty(lead_shape + (NUM_CLASSES,), dtype=dtype)
    labels = np.empty(lead_shape, dtype=np.int64)
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction=reduction)
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, inplace=inplace)
    for got in (loss, loss_g):
        assert got.dtype == loss_dtype_for(dtype)
        if reduction == "none":
            assert got.shape == lead_shape
        else:
            assert got.shape == () and float(got) == 0.0  # "mean" too: 0.0, not NaN
    assert grad.shape == logits.shape and grad.dtype == dtype
    assert (grad is logits) == inplace


IGNORE_INDEX = -100


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_all_rows_ignored(rng, kernel_path, dtype, reduction):
    logits = random_logits(rng, (3, NUM_CLASSES), dtype)
    logits[1, 7] = np.nan  # garbage in an ignored row must not leak out
    logits[2, -1] = np.inf
    labels = np.full(3, IGNORE_INDEX)
    for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3, "class_weight": np.ones(NUM_CLASSES)}):
        loss = fastxent.sparse_cross_entropy(logits, labels, reduction=reduction, ignore_index=IGNORE_INDEX, **options)
        work = logits.copy()
        loss_g, grad = fastxent.sparse_cross_entropy_with_grad(
            work, labels, reduction=reduction, ignore_index=IGNORE_INDEX, inplace=True, **options
        )
        assert grad is work
        for got in (loss, loss_g):
            assert got.dtype == loss_dtype_for(dtype)
            assert got.shape == ((3,) if reduction == "none" else ())
            assert not np.isnan(got).any()
            assert (got == 0).all()
        assert (grad.astype(np.float64) == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_ignored_rows_with_garbage_are_not_counted(rng, kernel_path, dtype):
    logits = random_logits(rng, (3, NUM_CLASSES), dtype)
    logits[1, :] = np.nan
    labels = random_labels(rng, (3,), NUM_CLASSES)
    labels[1] = IGNORE_INDEX
    for reduction in REDUCTIONS:
        loss, grad = fastxent.sparse_cross_entropy_with_grad(
            logits, labels, reduction=reduction, ignore_index=IGNORE_INDEX
        )
        ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
            logits, labels, reduction=reduction, ignore_index=IGNORE_INDEX
        )
        assert np.isfinite(loss).all()
        assert_loss_close(loss, ref_loss, dtype)
        assert_grad_close(grad, ref_grad, dtype)
        assert not grad[1].astype(np.float64).any()


def test_mean_divides_by_counted_rows_only(rng, kernel_path):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float64)
    labels = random_labels(rng, (3,), NUM_CLASSES)
    labels[0] = IGNORE_INDEX
    per_row = fastxent.sparse_cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    assert per_row[0] == 0.0
    for reduction in ("mean", "sum_over_batch_size"):
        loss = fastxent.sparse_cross_entropy(logits, labels, reduction=reduction, ignore_index=IGNORE_INDEX)
        np.testing.assert_allclose(loss, per_row[1:].sum() / 2, rtol=1e-13)


# ----------------------------------------------------------------------------------------
# Probabilities
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (np.dtype(np.float32), np.dtype(np.float16)), ids=dtype_id)
def test_zero_probability_on_target_scores_16_118(dtype):
    probs = np.array([[0.0, 0.5, 0.5], [0.0, 0.25, 0.75]], dtype=dtype)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(probs, np.array([0, 0]), from_logits=False, reduction="none")
    assert np.round(loss.astype(np.float64), 3).tolist() == [16.118, 16.118]
    # The clip is flat below 1e-7: no gradient flows to a zero probability.
    assert (grad[:, 0].astype(np.float64) == 0).all()


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_one_softcapped_class_never_has_a_negative_loss(monkeypatch, path):
    """The max and the sum of exps come from different passes; a softcapped logit once rounded an
    ulp apart between them and gave a one-class float32 row the loss -6e-8."""
    force_kernel_path(monkeypatch, path)
    for value in (3.0, -2.5, 0.7, 40.0):
        for softcap in (3.0, 1.0, 7.5):
            loss = fastxent.sparse_cross_entropy(
                np.array([[value]], np.float32), np.array([0]), softcap=softcap, reduction="none"
            )
            assert 0.0 <= loss[0] <= 4 * np.finfo(np.float32).eps, (value, softcap, loss)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("num_classes", (2047, 6000))
def test_many_alike_terms_keep_their_sum(monkeypatch, path, num_classes):
    """One large logit and thousands of equal ones: float32 partial sums of alike terms round the
    same way at every addition (a whole block of them lost 3e-6 of the sum, 1.3e-5 of the loss)."""
    force_kernel_path(monkeypatch, path)
    logits = np.zeros((2, num_classes), np.float32)
    logits[:, 0] = 9.0
    logits[1, 1:] = -0.25
    labels = np.array([0, 3])
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    np.testing.assert_allclose(loss.astype(np.float64), ref_loss, rtol=2e-6)
    assert_grad_close(grad, ref_grad, np.float32)
    assert np.abs(grad.astype(np.float64).sum(axis=1)).max() <= 1e-6


@pytest.mark.parametrize("max_block", [0, 1, 4, 5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_running_max_across_full_blocks(rng, kernel_path, dtype, max_block):
    """Rows of five full blocks and a tail. In float32 and float64 each full block's exp-sum is
    taken in the loop that finds the next full block's max, so the running max must move at
    the right block: the max in a given block, maxima rising block by block, leading blocks
    of -inf, and a NaN in a block that is only ever read ahead of its own sum."""
    num_classes = 5 * BLOCK + 100
    block_of = np.arange(num_classes) // BLOCK
    logits = random_logits(rng, (5, num_classes), dtype)
    labels = rng.integers(0, num_classes, 5)
    logits[0, max_block * BLOCK + 7] = 30.0  # far above the rest, in one block, and the target
    labels[0] = max_block * BLOCK + 7
    logits[1] += (5 * block_of).astype(dtype)  # every block moves the running max
    logits[2] -= (5 * block_of).astype(dtype)  # the first block holds the max
    logits[3, : 2 * BLOCK] = -np.inf  # the first two full blocks sum relative to 0
    labels[3] = rng.integers(2 * BLOCK, num_classes)
    logits[4, max_block * BLOCK + 11] = np.nan

    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(logits.copy(), labels, reduction="none", inplace=True)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    assert np.isnan(ref_loss[4])
    for got in (loss, loss_g):
        assert_loss_close(got, ref_loss, dtype)
    assert_grad_close(grad[:4], ref_grad[:4], dtype)
    assert not grad[3, : 2 * BLOCK].astype(np.float64).any()


@pytest.mark.parametrize("destination", ["inplace", "out", "new"])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "class_weight": True, "z_loss": 1e-3}], ids=["plain", "smoothed"]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_gradient_from_kept_exps(rng, kernel_path, dtype, options, destination):
    """For float32 and float64 the statistics pass stores every exp where the gradient goes and
    the gradient pass rescales them block by block. Checked where that can go wrong: block
    factors that differ (a max rising block by block), blocks summed before any finite logit
    beside a final max of -1000 (their factor must be 0, not 0 * exp(1000)), label smoothing
    and class weights (their sum must be read before the logits are overwritten), every
    destination of the gradient, and the input left alone unless in place."""
    num_classes = 4 * BLOCK + 300
    block_of = np.arange(num_classes) // BLOCK
    logits = random_logits(rng, (4, num_classes), dtype)
    labels = rng.integers(2 * BLOCK, num_classes, 4)
    logits[1] += (4 * block_of).astype(dtype)
    logits[2] -= np.asarray(1000.0, dtype)
    logits[2, : 2 * BLOCK] = -np.inf
    logits[3, BLOCK + 5] = np.inf  # loss and gradient NaN
    kwargs = dict(options, reduction="none")
    if kwargs.pop("class_weight", False):
        kwargs["class_weight"] = rng.uniform(0.5, 2.0, num_classes)
    pristine = logits.copy()

    if destination == "inplace":
        loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, inplace=True, **kwargs)
        assert grad is logits
    elif destination == "out":
        buffer = np.full_like(logits, 7.0)
        loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, out=buffer, **kwargs)
        assert grad is buffer
        np.testing.assert_array_equal(logits, pristine)
    else:
        loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, **kwargs)
        np.testing.assert_array_equal(logits, pristine)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(pristine, labels, **kwargs)

    assert np.isnan(loss[3])
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad[:3], ref_grad[:3], dtype)
    assert not grad[2, : 2 * BLOCK].astype(np.float64).any() or "label_smoothing" in kwargs
    assert np.isnan(grad[3].astype(np.float64)).all()
