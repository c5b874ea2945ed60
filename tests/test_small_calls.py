"""Small calls: the kept static checks, the compiled label pass and the calling-thread kernel.

A call's shape, dtype and option checks are kept per (shapes, dtypes, options) once they pass
(``fastxent._api.static_checks``); the labels' values are checked on every call by one compiled
pass (``fastxent.cpu.targets``); inputs up to ``SERIAL_WORK`` elements run on the calling thread.
Each test here fails if one of them serves a stale answer or skips a check.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import (
    BFLOAT16,
    FLOAT_DTYPES,
    OPTION_NAMES,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    gradient_scale,
    make_case,
    random_labels,
    random_logits,
)

import fastxent
from fastxent import _api, reference
from fastxent.cpu import _kernels
from fastxent.cpu import xent as cpu_xent

NUM_CLASSES = 7


def test_a_kept_call_still_checks_every_label(rng):
    """Same shapes, dtypes and options as a call that passed: each bad label is still found,
    with its own value and position."""
    logits = random_logits(rng, (3, 4, NUM_CLASSES), np.float32)
    labels = random_labels(rng, (3, 4), NUM_CLASSES)
    fastxent.sparse_cross_entropy(logits, labels)  # passes: its static checks are kept
    for where, value in (((0, 0), NUM_CLASSES), ((2, 3), -1), ((1, 2), 10**6)):
        bad = labels.copy()
        bad[where] = value
        with pytest.raises(ValueError, match=rf"label {value} at position \({where[0]}, {where[1]}\)"):
            fastxent.sparse_cross_entropy(logits, bad)
        with pytest.raises(ValueError, match=rf"label {value} at position \({where[0]}, {where[1]}\)"):
            fastxent.sparse_cross_entropy_with_grad(logits, bad)
    # ignore_index turns the same value into an ignored row, and back into an error without it
    bad = labels.copy()
    bad[1, 1] = -100
    fastxent.sparse_cross_entropy(logits, bad, ignore_index=-100)
    with pytest.raises(ValueError, match=r"label -100 at position \(1, 1\)"):
        fastxent.sparse_cross_entropy(logits, bad)


@pytest.mark.parametrize(
    "first, second, error",
    [
        ({"from_logits": True}, {"from_logits": 1}, TypeError),  # equal to True, but not a bool
        ({"label_smoothing": 0.5}, {"label_smoothing": 1.0}, ValueError),
        ({"label_smoothing": 0.0}, {"label_smoothing": True}, ValueError),  # True == 1
        ({"z_loss": 0.0}, {"z_loss": -1.0}, ValueError),
        ({"z_loss": 0.0}, {"z_loss": float("nan")}, ValueError),
        ({"softcap": 5.0}, {"softcap": 0.0}, ValueError),
        ({"softcap": None, "from_logits": True}, {"softcap": 5.0, "from_logits": False}, ValueError),
        ({"reduction": "mean"}, {"reduction": "average"}, ValueError),
        ({"ignore_index": 3}, {"ignore_index": 3.0}, TypeError),  # equal to 3, but not an integer
        ({"axis": -1}, {"axis": 2}, ValueError),
        ({"axis": -1}, {"axis": 1.0}, ValueError),
    ],
)
def test_a_kept_call_does_not_pass_other_options(rng, first, second, error):
    """Options equal (==) to ones that passed, or on the same arrays, still get their own checks."""
    logits = random_logits(rng, (4, NUM_CLASSES), np.float32)
    labels = random_labels(rng, (4,), NUM_CLASSES)
    fastxent.sparse_cross_entropy(logits, labels, **first)
    with pytest.raises(error):
        fastxent.sparse_cross_entropy(logits, labels, **second)


def test_a_kept_call_still_checks_shapes_dtypes_and_arrays(rng):
    logits = random_logits(rng, (4, NUM_CLASSES), np.float32)
    labels = random_labels(rng, (4,), NUM_CLASSES)
    fastxent.sparse_cross_entropy_with_grad(logits, labels)
    with pytest.raises(ValueError, match="labels shape"):
        fastxent.sparse_cross_entropy(logits, labels[:3])
    with pytest.raises(TypeError, match="labels must be integers"):
        fastxent.sparse_cross_entropy(logits, labels.astype(np.float32))
    with pytest.raises(TypeError, match="logits must be"):
        fastxent.sparse_cross_entropy(logits.astype(np.int32), labels)
    with pytest.raises(ValueError, match="class_weight"):
        fastxent.sparse_cross_entropy(logits, labels, class_weight=np.ones(NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="sample_weight"):
        fastxent.sparse_cross_entropy(logits, labels, sample_weight=np.ones(5))
    read_only = logits.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        fastxent.sparse_cross_entropy_with_grad(read_only, labels, inplace=True)
    with pytest.raises(ValueError, match="overlaps"):
        fastxent.sparse_cross_entropy_with_grad(logits, labels, out=logits)


@pytest.mark.parametrize("reduction", fastxent.REDUCTIONS)
def test_each_option_set_gets_its_own_result(rng, reduction):
    """Calls alternating options on the same arrays each match the reference: no option set is
    served another's kernel options (grad_scale, smoothing, z_loss, softcap, ignore_index)."""
    logits = random_logits(rng, (5, NUM_CLASSES), np.float32)
    labels = random_labels(rng, (5,), NUM_CLASSES)
    labels[1] = 2
    option_sets = [
        {},
        {"label_smoothing": 0.2},
        {"z_loss": 0.01},
        {"softcap": 2.0},
        {"ignore_index": 2},
        {"sample_weight": np.arange(1.0, 6.0)},
        {"class_weight": np.linspace(0.5, 2.0, NUM_CLASSES)},
        {},
    ]
    for _ in range(2):
        for options in option_sets:
            got_loss, got_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **options)
            ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
                logits, labels, reduction=reduction, **options
            )
            assert_loss_close(got_loss, ref_loss, np.float32)
            scale = gradient_scale(labels, reduction=reduction, **options)
            assert_grad_close(got_grad, ref_grad, np.float32, scale=scale)


def test_every_row_ignored_then_none(rng):
    """The denominator follows the labels' values: all ignored gives 0.0, then a counted call
    with the same shapes and options gives the real mean."""
    logits = random_logits(rng, (3, NUM_CLASSES), np.float32)
    ignored = np.full(3, -100)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, ignored, ignore_index=-100)
    assert float(loss) == 0.0 and not grad.any()
    labels = random_labels(rng, (3,), NUM_CLASSES)
    loss = fastxent.sparse_cross_entropy(logits, labels, ignore_index=-100)
    assert_loss_close(loss, reference.sparse_cross_entropy(logits, labels), np.float32)


@pytest.mark.parametrize("labels_dtype", (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.uint64))
def test_label_dtypes(rng, labels_dtype):
    """Every integer dtype is checked exactly: uint64 on NumPy's path, the others compiled."""
    logits = random_logits(rng, (4, NUM_CLASSES), np.float32)
    labels = random_labels(rng, (4,), NUM_CLASSES).astype(labels_dtype)
    assert_loss_close(
        fastxent.sparse_cross_entropy(logits, labels), reference.sparse_cross_entropy(logits, labels), np.float32
    )
    big = labels.copy()
    big[2] = np.iinfo(labels_dtype).max
    with pytest.raises(ValueError, match=rf"label {np.iinfo(labels_dtype).max} at position \(2,\)"):
        fastxent.sparse_cross_entropy(logits, big)
    # an ignore_index the dtype cannot hold ignores nothing
    with pytest.raises(ValueError, match=rf"label {np.iinfo(labels_dtype).max} at position \(2,\)"):
        fastxent.sparse_cross_entropy(logits, big, ignore_index=2**70)
    # one it can hold is ignored
    fastxent.sparse_cross_entropy(logits, big, ignore_index=int(np.iinfo(labels_dtype).max))


@pytest.mark.parametrize("dtype", (np.float32, np.float16, BFLOAT16), ids=dtype_id)
def test_softmax_hint_on_a_kept_call(dtype):
    """The hint looks at each call's first row: a call with real logits does not warn, the next
    one with a softmax output (same shapes and options) does."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, NUM_CLASSES)) * 3).astype(dtype)
    labels = random_labels(rng, (3,), NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastxent.sparse_cross_entropy(logits, labels)
    probabilities = np.exp(logits.astype(np.float64))
    probabilities = (probabilities / probabilities.sum(axis=-1, keepdims=True)).astype(dtype)
    with pytest.warns(UserWarning, match="from_logits=False"):
        fastxent.sparse_cross_entropy(probabilities, labels)


def test_kept_checks_are_bounded(rng):
    """The store of kept checks is cleared when full: many shapes do not grow it without end."""
    for rows in range(1, _api._STATIC_LIMIT + 50):
        fastxent.sparse_cross_entropy(np.zeros((rows, 2), np.float32), np.zeros(rows, np.int64))
    assert 0 < len(_api._STATIC) <= _api._STATIC_LIMIT


# ----------------------------------------------------------------------------------------
# The calling-thread kernel
# ----------------------------------------------------------------------------------------

SMALL_SHAPES = ((1, 2), (3, NUM_CLASSES), (2, 3, 50), (8, 1000))


def test_small_shapes_run_on_the_calling_thread():
    for shape in SMALL_SHAPES:
        assert np.prod(shape) * 2 <= cpu_xent.SERIAL_WORK, shape
    assert 64 * 1000 > cpu_xent.SERIAL_WORK  # and a larger input does not


@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ("loss", "grad", "inplace", "out"))
def test_small_calls_match_the_reference(rng, option, dtype, shape, mode):
    logits, labels, options = make_case(rng, option, shape[:-1], shape[-1], dtype)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, **options)
    if mode == "loss":
        assert_loss_close(fastxent.sparse_cross_entropy(logits, labels, **options), ref_loss, dtype)
        return
    given = logits.copy()
    out = np.empty_like(logits) if mode == "out" else None
    loss, grad = fastxent.sparse_cross_entropy_with_grad(given, labels, inplace=mode == "inplace", out=out, **options)
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype, scale=gradient_scale(labels, **options))
    if mode == "inplace":
        assert grad is given
    if mode == "out":
        assert grad is out


def _driver_results(logits, labels, options, work):
    """(loss, gradient, in-place loss, in-place gradient) of one driver: ``work`` is the
    calling-thread cut-off, 2**62 for the calling thread and -1 for the thread pool."""
    saved, cpu_xent.SERIAL_WORK = cpu_xent.SERIAL_WORK, work
    try:
        given = logits.copy()
        loss, grad = fastxent.sparse_cross_entropy_with_grad(given, labels, reduction="none", **options)
        inplace_loss, _ = fastxent.sparse_cross_entropy_with_grad(
            given, labels, reduction="none", inplace=True, **options
        )
    finally:
        cpu_xent.SERIAL_WORK = saved
    return tuple(np.asarray(part) for part in (loss, grad, inplace_loss, given))


def _as_float64(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32).astype(np.float64) if values.dtype == BFLOAT16 else values.astype(np.float64)


@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_calling_thread_and_thread_pool_agree(rng, option, dtype):
    """Both drivers run the same row code: each is reproducible bit for bit, and the two agree
    to a few units in the last place of the stored type, loss and gradient, in place too.

    Not bit for bit between the two: they are two compiled functions, and Numba links the row
    code into each (weak symbols that LLVM may inline and optimise per caller, whose names depend
    on the order of compilation in the process that filled the cache). In clean-clone CI runs on a
    cold cache the two have differed in the last bits of a few gradients of one row; never here
    with a fresh compile for the native, AVX2 and Zen 4 targets."""
    logits, labels, options = make_case(rng, option, (6,), 300, dtype)
    serial = _driver_results(logits, labels, options, 2**62)
    parallel = _driver_results(logits, labels, options, -1)
    names = ("loss", "gradient", "in-place loss", "in-place gradient")
    for name, first, again in zip(names, serial, _driver_results(logits, labels, options, 2**62), strict=True):
        np.testing.assert_array_equal(first.view(np.uint8), again.view(np.uint8), err_msg=f"calling thread, {name}")
    for name, first, again in zip(names, parallel, _driver_results(logits, labels, options, -1), strict=True):
        np.testing.assert_array_equal(first.view(np.uint8), again.view(np.uint8), err_msg=f"thread pool, {name}")
    for name, a, b in zip(names, serial, parallel, strict=True):
        a, b = _as_float64(a), _as_float64(b)
        # The loss is float64 from float32 or wider sums: a few float32 ulps of the loss; each
        # gradient element a few ulps of the stored type, of itself or of the row's largest entry
        # (an element that cancels, softmax minus a weight, is exact only to the latter).
        eps = float(np.finfo(np.float32 if name.endswith("loss") else logits.dtype).eps)
        if logits.dtype == BFLOAT16 and not name.endswith("loss"):
            eps = 2.0**-7
        scale = np.abs(a).max(axis=-1, keepdims=True) if a.ndim == 2 else np.abs(a)
        bound = 4 * eps * np.maximum(np.maximum(np.abs(a), np.abs(b)), scale)
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        finite = ~np.isnan(a)
        worst = np.abs(a - b)[finite] - bound[finite]
        assert worst.size == 0 or worst.max() <= 0, (name, np.abs(a - b)[finite].max())


def test_serial_kernel_is_the_one_called(rng, monkeypatch):
    """Guards the threshold: a small call reaches logit_rows_serial, a large one logit_rows."""
    called = []
    for name in ("logit_rows", "logit_rows_serial"):
        kernel = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *args, _k=kernel, _n=name: (called.append(_n), _k(*args))[1])
    logits = random_logits(rng, (8, 1000), np.float32)
    fastxent.sparse_cross_entropy_with_grad(logits, random_labels(rng, (8,), 1000))
    logits = random_logits(rng, (64, 1000), np.float32)
    fastxent.sparse_cross_entropy(logits, random_labels(rng, (64,), 1000))
    assert called == ["logit_rows_serial", "logit_rows"]
