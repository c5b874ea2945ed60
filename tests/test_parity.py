"""fastxent against the float64 reference: every option, reduction, dtype, layout and kernel path.

For float16 and bfloat16 a second rule applies on top of the tolerance ceiling: the fused kernel
must be at least as accurate as the unfused NumPy computation carried out in the same dtype
(``naive_in_dtype``), element for element.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    CLASS_COUNTS,
    FLOAT_DTYPES,
    LARGE_CLASS_COUNT,
    LARGE_CLASS_LEAD_SHAPES,
    LEAD_SHAPES,
    LOW_PRECISION_DTYPES,
    OPTION_NAMES,
    REDUCTIONS,
    SPLIT_CASES,
    assert_at_least_naive_accuracy,
    assert_grad_close,
    assert_loss_close,
    assert_path_taken,
    dtype_id,
    gradient_scale,
    loss_dtype_for,
    make_case,
    random_labels,
    random_logits,
    random_probabilities,
    shape_id,
    split_part_count,
)

import fastxent
from fastxent import reference

PROB_LOW = np.float32(1e-7)
PROB_HIGH = np.float32(1 - 1e-7)


def naive_in_dtype(
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
):
    """Unfused loss and gradient with every intermediate rounded to the logits' dtype."""
    dtype = np.asarray(logits).dtype

    def cast(value):
        return np.asarray(value, dtype=np.float64).astype(dtype)

    x = np.moveaxis(np.asarray(logits), axis, -1)
    lead_shape, num_classes = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, num_classes)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    num_rows = y.shape[0]
    valid = np.ones(num_rows, bool) if ignore_index is None else y != ignore_index
    safe_y = np.where(valid, y, 0)
    rows = np.arange(num_rows)
    one, zero = cast(1.0), cast(0.0)
    with np.errstate(all="ignore"):
        if not from_logits:
            low, high = cast(PROB_LOW), cast(PROB_HIGH)
            clipped = np.clip(x, low, high)
            values = np.log(clipped)
            dvalues = np.where((x >= low) & (x <= high), one / clipped, zero)
        elif softcap is None:
            values, dvalues = x, np.ones_like(x)
        else:
            cap = cast(softcap)
            values = cap * np.tanh(x / cap)
            dvalues = one - (values / cap) * (values / cap)
        row_max = values.max(axis=1, keepdims=True)
        shifted = values - row_max
        exps = np.exp(shifted)
        sum_exp = exps.sum(axis=1, keepdims=True, dtype=dtype)
        log_sum = np.log(sum_exp)
        log_probs = shifted - log_sum
        probs = exps / sum_exp
        lse = (row_max + log_sum)[:, 0]
        weights = np.ones(num_classes, dtype) if class_weight is None else cast(class_weight)
        target_weight = weights[safe_y]
        eps, count = cast(label_smoothing), cast(num_classes)
        loss = target_weight * (one - eps) * -log_probs[rows, safe_y]
        if label_smoothing:
            loss = loss - eps / count * (log_probs * weights).sum(axis=1, dtype=dtype)
        if z_loss:
            loss = loss + cast(z_loss) * target_weight * lse * lse
        coef = (
            target_weight * (one - eps)
            + eps * weights.sum(dtype=dtype) / count
            + cast(2 * z_loss) * target_weight * lse
        )
        grad = probs * coef[:, None] - (eps / count) * weights[None, :]
        grad[rows, safe_y] -= target_weight * (one - eps)
        grad = grad * dvalues
        sample = (
            np.ones(num_rows, dtype)
            if sample_weight is None
            else cast(np.broadcast_to(np.asarray(sample_weight, np.float64), lead_shape).reshape(-1))
        )
        loss = np.where(valid, loss * sample, zero)
        grad = np.where(valid[:, None], grad * sample[:, None], zero)
        if reduction == "none":
            total = loss.reshape(lead_shape)
        else:
            if reduction == "sum":
                denominator = one
            elif reduction == "mean":
                denominator = np.where(valid, sample * target_weight, zero).sum(dtype=dtype)
            else:
                denominator = cast(np.count_nonzero(valid))
            if float(denominator) == 0.0:
                total, grad = zero, grad * zero
            else:
                total, grad = loss.sum(dtype=dtype) / denominator, grad / denominator
    grad = np.moveaxis(grad.reshape(lead_shape + (num_classes,)), -1, axis)
    return np.asarray(total), grad


def check_parity(logits, labels, *, inplace=False, **options):
    """Forward and forward+backward against the reference; returns (loss, grad)."""
    dtype = logits.dtype
    axis = options.get("axis", -1)
    lead_shape = tuple(np.delete(np.array(logits.shape, dtype=np.int64), axis % logits.ndim))
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, **options)
    arguments = [logits, labels] + [v for v in options.values() if isinstance(v, np.ndarray)]
    before = [a.copy() for a in arguments]

    loss = fastxent.sparse_cross_entropy(logits, labels, **options)
    assert isinstance(loss, np.ndarray)
    assert loss.dtype == loss_dtype_for(dtype)
    assert loss.shape == (lead_shape if options.get("reduction", "mean") == "none" else ())
    assert_loss_close(loss, ref_loss, dtype)

    work = logits.copy() if inplace else logits
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(work, labels, inplace=inplace, **options)
    assert loss_g.dtype == loss.dtype and loss_g.shape == loss.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    if inplace:
        assert grad is work
    else:
        assert not np.shares_memory(grad, logits)
    for original, copy in zip(arguments, before, strict=True):
        assert original.tobytes() == copy.tobytes(), "an input was modified"
    assert_loss_close(loss_g, ref_loss, dtype)
    scale = gradient_scale(labels, **options)
    assert_grad_close(grad, ref_grad, dtype, scale=scale)

    if dtype in LOW_PRECISION_DTYPES:
        naive_loss, naive_grad = naive_in_dtype(logits, labels, **options)
        assert_at_least_naive_accuracy(loss, ref_loss, naive_loss, dtype, "loss")
        assert_at_least_naive_accuracy(grad, ref_grad, naive_grad, dtype, "grad", scale=scale)
    return loss, grad


# ----------------------------------------------------------------------------------------
# The shape grid, plain options
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("lead_shape", LEAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_shape_grid(rng, kernel_path, dtype, lead_shape, num_classes):
    num_rows = int(np.prod(lead_shape))
    assert_path_taken(kernel_path, num_rows, num_classes)
    logits = random_logits(rng, lead_shape + (num_classes,), dtype)
    labels = random_labels(rng, lead_shape, num_classes)
    reduction = REDUCTIONS[(len(lead_shape) + num_classes) % len(REDUCTIONS)]
    check_parity(logits, labels, reduction=reduction, inplace=num_classes % 2 == 1)
    check_parity(logits, labels, reduction="none")


@pytest.mark.parametrize("lead_shape", LARGE_CLASS_LEAD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_large_vocabulary(rng, kernel_path, dtype, lead_shape):
    logits = random_logits(rng, lead_shape + (LARGE_CLASS_COUNT,), dtype)
    labels = random_labels(rng, lead_shape, LARGE_CLASS_COUNT)
    if kernel_path == "split":
        assert split_part_count(int(np.prod(lead_shape)), LARGE_CLASS_COUNT) >= 2
    check_parity(logits, labels, reduction="sum", inplace=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_default_dispatch_few_long_rows(rng, dtype):
    """Without any patching, one row of a large vocabulary goes to the split-row path."""
    num_classes = 4 * LARGE_CLASS_COUNT
    assert fastxent.cpu.xent.use_split_rows(1, num_classes)
    logits = random_logits(rng, (1, num_classes), dtype)
    labels = random_labels(rng, (1,), num_classes)
    check_parity(logits, labels, reduction="mean")


# ----------------------------------------------------------------------------------------
# Every option, every reduction, both paths, in place or not
# ----------------------------------------------------------------------------------------

# (lead shape, classes) per path: the row path over two blocks per row, the split path cut
# into at least two parts per row.
OPTION_SHAPES = {"rows": ((2, 3), 2500), "split": SPLIT_CASES[1]}


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_options(rng, kernel_path, dtype, option, reduction, inplace):
    lead_shape, num_classes = OPTION_SHAPES[kernel_path]
    if kernel_path == "split":
        assert split_part_count(int(np.prod(lead_shape)), num_classes) >= 2
    logits, labels, options = make_case(rng, option, lead_shape, num_classes, dtype)
    check_parity(logits, labels, reduction=reduction, inplace=inplace, **options)


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "option", ("plain", "ignore_index", "label_smoothing", "class_weight", "sample_weight", "z_loss", "everything")
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_probabilities(rng, dtype, option, reduction, inplace):
    lead_shape, num_classes = (3, 4), 1000
    probs, labels, options = make_case(rng, option, lead_shape, num_classes, dtype, from_logits=False)
    # Exact zeros, one of them on a target (clipped to 1e-7: the 16.118 loss of SEMANTICS).
    assert (probs == 0).any()
    probs.reshape(-1, num_classes)[0, labels.reshape(-1)[0]] = 0
    check_parity(probs, labels, from_logits=False, reduction=reduction, inplace=inplace, **options)


def test_probabilities_not_summing_to_one(rng):
    probs = random_probabilities(rng, (4, 50), np.float32, zero_fraction=0.0)
    # Away from Keras' clip bound (1e-7), where scaling a row does change the loss: Keras clips
    # before it renormalises, so 0.25 * p < 1e-7 <= p scores differently (ln 4 apart).
    probs = np.maximum(probs, np.float32(1e-5))
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32) * np.float32(0.25)
    labels = random_labels(rng, (4,), 50)
    loss, _ = check_parity(probs, labels, from_logits=False, reduction="none")
    # Keras' softmax over log(p) renormalises: the scale of a row does not matter.
    np.testing.assert_allclose(
        loss,
        fastxent.sparse_cross_entropy(probs * np.float32(4), labels, from_logits=False, reduction="none"),
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------------------
# Layouts: class axis, non-contiguous input, in place
# ----------------------------------------------------------------------------------------

AXIS_CASES = (
    ((1000, 5), 0),
    ((3, 2049, 4), 1),
    ((3, 2049, 4), -2),
    ((2, 3, 7), -1),
    ((7, 2, 3), -3),
)


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("shape,axis", AXIS_CASES, ids=lambda case: str(case))
@pytest.mark.parametrize("dtype", (np.dtype(np.float32), np.dtype(np.float16)), ids=dtype_id)
def test_class_axis(rng, kernel_path, dtype, shape, axis, inplace):
    logits = random_logits(rng, shape, dtype)
    lead_shape = tuple(np.delete(np.array(shape), axis % len(shape)))
    labels = random_labels(rng, lead_shape, shape[axis])
    check_parity(logits, labels, axis=axis, reduction="mean", inplace=inplace, label_smoothing=0.05)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_inplace_on_a_strided_view_writes_back(rng, kernel_path, dtype):
    base = random_logits(rng, (3, 2 * 2500), dtype)
    untouched = base[:, 1::2].copy()
    view = base[:, ::2]
    original = view.copy()
    labels = random_labels(rng, (3,), 2500)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(original, labels, reduction="sum")
    loss, grad = fastxent.sparse_cross_entropy_with_grad(view, labels, reduction="sum", inplace=True)
    assert grad is view
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(base[:, ::2], ref_grad, dtype)
    assert base[:, 1::2].tobytes() == untouched.tobytes()


@pytest.mark.parametrize("order", ("C", "F"))
def test_inplace_axis0_and_fortran_order(rng, kernel_path, order):
    logits = np.asarray(random_logits(rng, (2500, 3), np.float32), order=order)
    labels = random_labels(rng, (3,), 2500)
    original = logits.copy()
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(original, labels, axis=0, z_loss=1e-2)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, axis=0, z_loss=1e-2, inplace=True)
    assert grad is logits
    assert_loss_close(loss, ref_loss, np.float32)
    assert_grad_close(logits, ref_grad, np.float32)


def test_inplace_gradient_matches_out_of_place(rng, kernel_path):
    logits = random_logits(rng, (3, 5000), np.float32)
    labels = random_labels(rng, (3,), 5000)
    loss_copy, grad_copy = fastxent.sparse_cross_entropy_with_grad(logits, labels, label_smoothing=0.1)
    loss_inplace, grad_inplace = fastxent.sparse_cross_entropy_with_grad(
        logits, labels, label_smoothing=0.1, inplace=True
    )
    assert grad_inplace is logits
    np.testing.assert_allclose(loss_inplace, loss_copy, rtol=1e-6)
    np.testing.assert_allclose(grad_inplace, grad_copy, rtol=1e-6, atol=1e-9)


def test_list_input_is_accepted(rng):
    logits = random_logits(rng, (4, 7), np.float64)
    labels = random_labels(rng, (4,), 7)
    assert_loss_close(
        fastxent.sparse_cross_entropy(logits.tolist(), labels.tolist()),
        reference.sparse_cross_entropy(logits, labels),
        np.float64,
    )


# ----------------------------------------------------------------------------------------
# log_softmax_gather
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_softmax_gather(rng, kernel_path, dtype):
    logits = random_logits(rng, (2, 3, 2049), dtype)
    labels = random_labels(rng, (2, 3), 2049)
    got = fastxent.log_softmax_gather(logits, labels)
    assert got.dtype == loss_dtype_for(dtype) and got.shape == (2, 3)
    assert (got <= 0).all()
    assert_loss_close(got, reference.log_softmax_gather(logits, labels), dtype)
    moved = np.moveaxis(logits, -1, 0)
    assert_loss_close(fastxent.log_softmax_gather(moved, labels, axis=0), got, dtype)
