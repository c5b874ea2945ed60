"""Every bad input of SEMANTICS.md raises ValueError/TypeError naming the offending value, and
leaves every input as it was, also when the gradient was to be written in place."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from conftest import (
    BFLOAT16,
    FLOAT_DTYPES,
    dtype_id,
    random_labels,
    random_logits,
    random_probabilities,
)

import fastxent

NUM_CLASSES = 5

ENTRY_POINTS = ("loss", "grad", "grad_inplace")


def call(entry, logits, labels, **options):
    if entry == "loss":
        return fastxent.sparse_cross_entropy(logits, labels, **options)
    return fastxent.sparse_cross_entropy_with_grad(logits, labels, inplace=entry == "grad_inplace", **options)


def assert_rejected(entry, error, pattern, logits, labels, **options):
    """The call raises ``error`` matching ``pattern`` and modifies none of its array arguments."""
    arrays = [a for a in (logits, labels, *options.values()) if isinstance(a, np.ndarray)]
    before = [a.tobytes() for a in arrays]
    with pytest.raises(error, match=pattern):
        call(entry, logits, labels, **options)
    for array, saved in zip(arrays, before, strict=True):
        assert array.tobytes() == saved, "input modified by a call that raised"


@pytest.fixture(params=ENTRY_POINTS)
def entry(request):
    return request.param


# ----------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bad_label", (NUM_CLASSES, NUM_CLASSES + 7, -1, -3))
def test_label_out_of_range(rng, kernel_path, entry, dtype, bad_label):
    logits = random_logits(rng, (2, 3, NUM_CLASSES), dtype)
    labels = random_labels(rng, (2, 3), NUM_CLASSES)
    labels[1, 2] = bad_label
    pattern = rf"label {bad_label} at position \(1, 2\).*\[0, {NUM_CLASSES}\)"
    assert_rejected(entry, ValueError, pattern, logits, labels)


def test_label_out_of_range_reports_the_first_one_and_ignore_index(rng, entry):
    logits = random_logits(rng, (6, NUM_CLASSES), np.float32)
    labels = np.array([0, -100, 9, 1, -4, 2])
    pattern = rf"label 9 at position \(2,\).*\[0, {NUM_CLASSES}\).*ignore_index=-100"
    assert_rejected(entry, ValueError, pattern, logits, labels, ignore_index=-100)


def test_label_out_of_range_single_row(rng, entry):
    logits = random_logits(rng, (NUM_CLASSES,), np.float64)
    assert_rejected(
        entry, ValueError, rf"label {NUM_CLASSES} at position \(\).*\[0, {NUM_CLASSES}\)", logits, np.array(NUM_CLASSES)
    )


def test_ignore_index_label_is_not_an_error(rng, entry):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    result = call(entry, logits, np.array([1, -100, 2]), ignore_index=-100)
    loss = result[0] if isinstance(result, tuple) else result
    assert np.isfinite(loss)


@pytest.mark.parametrize("labels_shape", ((2, 4), (3, 2), (6,), (2, 3, 1), ()))
def test_labels_shape_mismatch(rng, entry, labels_shape):
    logits = random_logits(rng, (2, 3, NUM_CLASSES), np.float32)
    labels = random_labels(rng, labels_shape, NUM_CLASSES)
    pattern = re.escape(f"labels shape {labels_shape}") + r".*" + re.escape("(2, 3)")
    assert_rejected(entry, ValueError, pattern, logits, labels)


@pytest.mark.parametrize("labels_dtype", (np.float32, np.float64, np.bool_, np.complex64))
def test_non_integer_labels(rng, entry, labels_dtype):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    labels = np.array([0, 1, 1]).astype(labels_dtype)
    assert_rejected(entry, TypeError, re.escape(np.dtype(labels_dtype).name), logits, labels)


# ----------------------------------------------------------------------------------------
# Logits
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("logits_dtype", (np.int32, np.int64, np.uint8, np.bool_, np.complex128))
def test_non_float_logits(rng, entry, logits_dtype):
    logits = (rng.standard_normal((3, NUM_CLASSES)) * 3).astype(logits_dtype)
    assert_rejected(entry, TypeError, re.escape(np.dtype(logits_dtype).name), logits, np.array([0, 1, 2]))


@pytest.mark.parametrize("shape,axis", (((3, 0), -1), ((0,), 0), ((0, 4), 0)))
def test_zero_classes(entry, shape, axis):
    logits = np.empty(shape, dtype=np.float32)
    labels = np.zeros(tuple(np.delete(np.array(shape), axis % len(shape))), dtype=np.int64)
    assert_rejected(entry, ValueError, r"no classes.*" + re.escape(str(shape)), logits, labels, axis=axis)


def test_scalar_logits(entry):
    assert_rejected(entry, ValueError, r"at least one dimension.*\(\)", np.array(1.5, dtype=np.float32), np.array(0))


@pytest.mark.parametrize("axis", (2, -3, 1.0))
def test_axis_out_of_range(rng, entry, axis):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(entry, ValueError, rf"axis {re.escape(repr(axis))}", logits, np.array([0, 1, 2]), axis=axis)


def test_inplace_needs_a_writeable_array(rng):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    logits.flags.writeable = False
    assert_rejected("grad_inplace", ValueError, "writeable", logits, np.array([0, 1, 2]))


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", (-0.1, 1.0, 1.5, float("nan")))
def test_label_smoothing_out_of_range(rng, entry, smoothing):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(
        entry,
        ValueError,
        r"label_smoothing.*" + re.escape(repr(smoothing)),
        logits,
        np.array([0, 1, 2]),
        label_smoothing=smoothing,
    )


@pytest.mark.parametrize("weight_shape", ((NUM_CLASSES - 1,), (NUM_CLASSES + 1,), (1, NUM_CLASSES), ()))
def test_class_weight_wrong_length(rng, entry, weight_shape):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    class_weight = np.ones(weight_shape)
    pattern = re.escape(f"({NUM_CLASSES},)") + r".*" + re.escape(str(weight_shape))
    assert_rejected(entry, ValueError, pattern, logits, np.array([0, 1, 2]), class_weight=class_weight)


@pytest.mark.parametrize("reduction", ("avg", "Mean", "", None, "batchmean"))
def test_unknown_reduction(rng, entry, reduction):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(
        entry, ValueError, r"reduction " + re.escape(repr(reduction)), logits, np.array([0, 1, 2]), reduction=reduction
    )


@pytest.mark.parametrize("softcap", (0.0, -1.0, -30.0, float("inf"), float("nan")))
def test_softcap_not_positive(rng, entry, softcap):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(
        entry, ValueError, r"softcap.*" + re.escape(repr(softcap)), logits, np.array([0, 1, 2]), softcap=softcap
    )


def test_softcap_with_probabilities(rng, entry):
    probs = random_probabilities(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(
        entry, ValueError, r"softcap.*from_logits=False", probs, np.array([0, 1, 2]), softcap=30.0, from_logits=False
    )


@pytest.mark.parametrize("z_loss", (-1e-4, float("inf"), float("nan")))
def test_z_loss_invalid(rng, entry, z_loss):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(
        entry, ValueError, r"z_loss.*" + re.escape(repr(z_loss)), logits, np.array([0, 1, 2]), z_loss=z_loss
    )


def test_sample_weight_not_broadcastable(rng, entry):
    logits = random_logits(rng, (2, 3, NUM_CLASSES), np.float32)
    labels = random_labels(rng, (2, 3), NUM_CLASSES)
    assert_rejected(
        entry, ValueError, r"sample_weight shape \(4,\).*\(2, 3\)", logits, labels, sample_weight=np.ones(4)
    )


def test_ignore_index_not_an_integer(rng, entry):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(entry, TypeError, r"ignore_index.*1\.5", logits, np.array([0, 1, 2]), ignore_index=1.5)


def test_from_logits_not_a_bool(rng, entry):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    assert_rejected(entry, TypeError, r"from_logits.*'yes'", logits, np.array([0, 1, 2]), from_logits="yes")


# ----------------------------------------------------------------------------------------
# Probabilities that are really logits, logits that are really probabilities
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_negative_probabilities_look_like_logits(rng, entry, dtype):
    probs = random_probabilities(rng, (2, 3, NUM_CLASSES), dtype)
    probs[1, 0, 3] = -0.25
    labels = random_labels(rng, (2, 3), NUM_CLASSES)
    pattern = r"from_logits=False.*\(1, 0\).*-0\.25.*looks like logits"
    assert_rejected(entry, ValueError, pattern, probs, labels, from_logits=False)


def test_logits_passed_as_probabilities(rng, entry):
    logits = random_logits(rng, (4, NUM_CLASSES), np.float32)
    logits[0, 0] = -abs(logits[0, 0]) - 0.5  # surely negative
    assert_rejected(entry, ValueError, "looks like logits", logits, np.array([0, 1, 2, 3]), from_logits=False)


@pytest.mark.parametrize("dtype", (np.float32, np.float64, np.float16), ids=dtype_id)
def test_softmax_output_as_logits_warns(rng, entry, dtype):
    probs = random_probabilities(rng, (3, NUM_CLASSES), np.float64, zero_fraction=0.0)
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(dtype)
    with pytest.warns(UserWarning, match="from_logits=False") as record:
        result = call(entry, probs, np.array([0, 1, 2]))
    # Attributed to the caller's line, not to fastxent's internals.
    assert [w.filename for w in record] == [__file__]
    loss = result[0] if isinstance(result, tuple) else result
    assert np.isfinite(loss)  # a warning, not an error: the call still computes


@pytest.mark.parametrize("axis", (-1, 0))
def test_long_softmax_row_warns_and_a_row_leaving_unit_range_late_does_not(rng, axis):
    """The hint looks at a prefix of the first row first: rows longer than it still get the
    whole-row check, both ways, along any class axis."""
    probs = random_probabilities(rng, (3, 300), np.float64, zero_fraction=0.0)
    probs = (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)
    late = probs.copy()
    late[0, 250] = 1.5  # in [0, 1] for the first 250 classes, then not
    labels = np.array([0, 1, 2])
    if axis == 0:
        probs, late = np.ascontiguousarray(probs.T), np.ascontiguousarray(late.T)
    with pytest.warns(UserWarning, match="from_logits=False"):
        fastxent.sparse_cross_entropy(probs, labels, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fastxent.sparse_cross_entropy(late, labels, axis=axis)


def test_real_logits_and_real_probabilities_do_not_warn(rng, entry):
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    probs = random_probabilities(rng, (3, NUM_CLASSES), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        call(entry, logits, np.array([0, 1, 2]))
        call(entry, probs, np.array([0, 1, 2]), from_logits=False)


def test_bfloat16_softmax_output_as_logits_warns(entry):
    # A softmax output rounded to bfloat16 (8 significant bits) sums to 1 only within about
    # 2**-8: these five round to 0.30078125 * 2 + 0.20019531 + 0.10009766 * 2 = 1.00195.
    probs = np.array([[0.3, 0.3, 0.2, 0.1, 0.1]]).astype(BFLOAT16)
    assert abs(float(probs.astype(np.float64).sum()) - 1) < 2.0**-8
    with pytest.warns(UserWarning, match="from_logits=False"):
        call(entry, probs, np.array([0]))
