"""fastxent.tf.sparse_softmax_cross_entropy_with_logits against TensorFlow's own op: loss, first
and second derivatives in eager mode and inside tf.function, dtypes, the label error, when the
gradient is computed and where it lives; and the core API against TensorFlow's fused op."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

from conftest import (  # noqa: E402
    BLOCK,
    PEER_GRAD_RTOL,
    assert_at_least_naive_accuracy,
    assert_grad_close,
    assert_loss_close,
    random_labels,
    random_logits,
    shape_id,
)

import fastxent  # noqa: E402
import fastxent.tf as fxtf  # noqa: E402
from fastxent import reference  # noqa: E402

pytestmark = pytest.mark.peers

TF_DTYPES = {"float32": tf.float32, "float64": tf.float64, "float16": tf.float16, "bfloat16": tf.bfloat16}
LEAD_SHAPES = {"row": (), "batch": (7,), "sequences": (2, 3)}
NUM_CLASSES = 11
EXACT = {tf.float32: dict(rtol=2e-5, atol=2e-6), tf.float64: dict(rtol=1e-12, atol=1e-13)}


def numpy_dtype(dtype):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype == tf.bfloat16 else np.dtype(dtype.name)


def as64(tensor):
    return tf.cast(tensor, tf.float64).numpy()


def derivatives(op, labels, logits, upstream, direction):
    """Loss, its gradient scaled by ``upstream``, and the derivative of <gradient, direction>."""
    with tf.GradientTape() as outer:
        outer.watch(logits)
        with tf.GradientTape() as inner:
            inner.watch(logits)
            loss = op(labels=labels, logits=logits)
        grad = inner.gradient(loss, logits, output_gradients=upstream)
        projected = tf.reduce_sum(grad * direction)
    return loss, grad, outer.gradient(projected, logits)


@pytest.mark.parametrize("dtype_name", list(TF_DTYPES))
@pytest.mark.parametrize("lead_name", list(LEAD_SHAPES))
@pytest.mark.parametrize("mode", ("eager", "graph"))
def test_matches_tensorflow(rng, dtype_name, lead_name, mode):
    dtype = TF_DTYPES[dtype_name]
    lead = LEAD_SHAPES[lead_name]
    logits = tf.cast(tf.constant(rng.standard_normal(lead + (NUM_CLASSES,)) * 3), dtype)
    labels = tf.constant(rng.integers(0, NUM_CLASSES, lead), dtype=tf.int32 if lead_name == "batch" else tf.int64)
    # Powers of two scale exactly, so half-precision checks see the kernel alone.
    upstream = tf.cast(tf.constant(rng.choice([0.5, 1.0, 2.0], lead)), dtype)
    direction = tf.cast(tf.constant(rng.standard_normal(lead + (NUM_CLASSES,))), dtype)
    run = derivatives if mode == "eager" else tf.function(derivatives, reduce_retracing=False)
    ours = run(fxtf.sparse_softmax_cross_entropy_with_logits, labels, logits, upstream, direction)
    theirs = run(tf.nn.sparse_softmax_cross_entropy_with_logits, labels, logits, upstream, direction)
    assert ours[0].dtype == theirs[0].dtype == dtype and ours[0].shape == theirs[0].shape
    assert ours[1].dtype == dtype and ours[1].shape == logits.shape
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(as64(logits), labels.numpy(), reduction="none")
    ref_grad = ref_grad * as64(upstream)[..., None]
    if dtype in EXACT:
        for mine, other in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(
                as64(mine),
                as64(other),
                rtol=EXACT[dtype]["rtol"],
                atol=EXACT[dtype]["atol"] * max(1.0, float(np.abs(as64(other)).max())),
            )
        assert_loss_close(as64(ours[0]), ref_loss, numpy_dtype(dtype))
        assert_grad_close(as64(ours[1]), ref_grad, numpy_dtype(dtype), scale=2.0)
        assert_grad_close(as64(ours[2]), ref_hessian_product(logits, upstream, direction), numpy_dtype(dtype))
    else:
        np_dtype = numpy_dtype(dtype)
        assert_at_least_naive_accuracy(as64(ours[0]), ref_loss, as64(theirs[0]), np_dtype, "loss")
        assert_at_least_naive_accuracy(as64(ours[1]), ref_grad, as64(theirs[1]), np_dtype, "grad", scale=2.0)
        assert_at_least_naive_accuracy(
            as64(ours[2]), ref_hessian_product(logits, upstream, direction), as64(theirs[2]), np_dtype, "grad"
        )


def ref_hessian_product(logits, upstream, direction, kept_rows=None):
    """upstream * H @ direction per row in float64, H = diag(p) - p p^T the softmax Jacobian."""
    z = as64(logits)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if kept_rows is not None:
        probs = probs * kept_rows[..., None]
    vector = as64(direction)
    product = probs * vector - probs * (probs * vector).sum(axis=-1, keepdims=True)
    return product * as64(upstream)[..., None]


@pytest.mark.parametrize("dtype_name", list(TF_DTYPES))
def test_second_derivative_skips_ignored_rows(rng, dtype_name):
    dtype = TF_DTYPES[dtype_name]
    logits = tf.cast(tf.constant(rng.standard_normal((6, NUM_CLASSES)) * 3), dtype)
    labels = rng.integers(0, NUM_CLASSES, 6)
    labels[[1, 4]] = -1
    upstream = tf.cast(tf.constant(rng.choice([0.5, 1.0, 2.0], 6)), dtype)
    direction = tf.cast(tf.constant(rng.standard_normal((6, NUM_CLASSES))), dtype)

    def op(labels, logits):
        return fxtf.sparse_per_row(logits, labels, ignore_index=-1)

    _, grad, second = derivatives(op, tf.constant(labels), logits, upstream, direction)
    assert not np.any(as64(grad)[[1, 4]]) and not np.any(as64(second)[[1, 4]])
    expected = ref_hessian_product(logits, upstream, direction, kept_rows=(labels != -1).astype(float))
    assert_grad_close(as64(second), expected, numpy_dtype(dtype))


def test_label_errors_are_clear():
    logits = tf.random.normal((3, 4))
    with pytest.raises(fxtf.InvalidLabelError, match=r"label 4 at position \(2,\) is outside the valid range \[0, 4\)"):
        fxtf.sparse_softmax_cross_entropy_with_logits(labels=[0, 1, 4], logits=logits)
    # Both the type fastxent raises and the type TensorFlow raises catch it.
    with pytest.raises(ValueError):
        fxtf.sparse_softmax_cross_entropy_with_logits(labels=[0, -1, 1], logits=logits)
    with pytest.raises(tf.errors.InvalidArgumentError):
        fxtf.sparse_softmax_cross_entropy_with_logits(labels=[0, -1, 1], logits=logits)
    # Inside a graph TensorFlow reports the host call's error as InvalidArgumentError, with our text.
    graph = tf.function(fxtf.sparse_softmax_cross_entropy_with_logits)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label 9 at position \(0,\) is outside the valid range"):
        graph(labels=tf.constant([9, 0, 0]), logits=logits)
    with pytest.raises(ValueError, match="Rank mismatch"):
        fxtf.sparse_softmax_cross_entropy_with_logits(labels=[[0, 1, 2]], logits=logits)
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        fxtf.sparse_softmax_cross_entropy_with_logits(labels=[0.0, 1.0, 2.0], logits=logits)


def test_xla_is_refused_with_a_hint():
    compiled = tf.function(fxtf.sparse_softmax_cross_entropy_with_logits, jit_compile=True)
    with pytest.raises(ValueError, match="jit_compile=False"):
        compiled(labels=tf.constant([0, 1]), logits=tf.random.normal((2, 3)))


def test_eager_exchange_shares_memory():
    logits = tf.random.normal((64, 33))
    array = fxtf._to_array(logits)
    assert np.shares_memory(array, fxtf._to_array(logits))  # a view of the tensor, not a copy
    halves = tf.cast(logits, tf.bfloat16)
    assert fxtf._to_array(halves).dtype == numpy_dtype(tf.bfloat16)
    np.testing.assert_array_equal(fxtf._to_array(halves).astype(np.float32), tf.cast(halves, tf.float32).numpy())
    # A 64-byte aligned result goes back to TensorFlow without a copy.
    buffer = np.empty(64 * 33 + 16, np.float32)
    start = (-buffer.ctypes.data % 64) // 4
    aligned = buffer[start : start + 64 * 33].reshape(64, 33)
    aligned[:] = 1.0
    tensor = fxtf._to_tensor(aligned, tf.float32)
    aligned[0, 0] = 5.0
    assert float(tensor[0, 0]) == 5.0


def reference_gradient(logits, labels, upstream):
    _, grad = reference.sparse_cross_entropy_with_grad(as64(logits), np.asarray(labels), reduction="none")
    return grad * np.asarray(upstream, dtype=np.float64)[:, None]


def test_gradient_with_and_without_a_tape_at_the_forward(rng):
    """The gradient is kept when a tape watches the forward call; otherwise (a tape around a
    tf.function traced without one, a forward-mode accumulator) the backward computes it."""
    logits = tf.constant(rng.standard_normal((5, 13)) * 3, tf.float32)
    labels = tf.constant(rng.integers(0, 13, 5))
    upstream = tf.constant(rng.choice([0.5, 1.0, 2.0, -1.0], 5), tf.float32)
    expected = reference_gradient(logits, labels, upstream)
    op = fxtf.sparse_softmax_cross_entropy_with_logits

    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = op(labels=labels, logits=logits)
    assert_grad_close(tape.gradient(loss, logits, output_gradients=upstream).numpy(), expected, np.float32)

    traced = tf.function(lambda x: op(labels=labels, logits=x))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = traced(logits)
    assert_grad_close(tape.gradient(loss, logits, output_gradients=upstream).numpy(), expected, np.float32)

    direction = tf.constant(rng.standard_normal((5, 13)), tf.float32)
    with tf.autodiff.ForwardAccumulator(logits, direction) as accumulator:
        loss = op(labels=labels, logits=logits)
    np.testing.assert_allclose(
        accumulator.jvp(loss).numpy(),
        (reference_gradient(logits, labels, np.ones(5)) * as64(direction)).sum(-1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_forward_without_a_tape_computes_no_gradient(rng, monkeypatch):
    calls = []
    monkeypatch.setattr(fxtf, "sparse_cross_entropy_with_grad", lambda *a, **k: calls.append(1) or 1 / 0)
    logits = tf.constant(rng.standard_normal((4, 9)), tf.float32)
    loss = fxtf.sparse_softmax_cross_entropy_with_logits(labels=[0, 1, 2, 3], logits=logits)
    assert loss.shape == (4,) and not calls


def test_in_place_scaling_serves_one_backward_only(rng):
    """A persistent tape's second gradient is computed afresh: the first result is not touched."""
    logits = tf.constant(rng.standard_normal((6, 70000)) * 3, tf.float32)  # pooled buffer size
    labels = tf.constant(rng.integers(0, 70000, 6))
    first_up = tf.constant(rng.choice([0.5, 2.0, 3.0], 6), tf.float32)
    second_up = tf.constant(rng.choice([0.25, 4.0], 6), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        loss = fxtf.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    first = tape.gradient(loss, logits, output_gradients=first_up)
    kept_copy = first.numpy()
    second = tape.gradient(loss, logits, output_gradients=second_up)
    np.testing.assert_array_equal(first.numpy(), kept_copy)
    assert_grad_close(kept_copy, reference_gradient(logits, labels, first_up), np.float32, scale=3.0)
    assert_grad_close(second.numpy(), reference_gradient(logits, labels, second_up), np.float32, scale=4.0)
    # The next forward gets its own buffer while these gradients are alive.
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = fxtf.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    third = tape.gradient(loss, logits, output_gradients=second_up)
    np.testing.assert_array_equal(first.numpy(), kept_copy)
    np.testing.assert_array_equal(third.numpy(), second.numpy())


def test_in_place_scaling_is_handed_to_one_thread_only(rng):
    """Two threads calling one persistent tape's gradient together: only one of them may scale the
    kept gradient in place (the kernel releases the GIL, so both could pass the check and scale
    the same buffer, giving rows scaled by the product of both upstream gradients)."""
    from concurrent.futures import ThreadPoolExecutor

    rows, classes = 256, 16384
    logits = tf.constant(rng.standard_normal((rows, classes)), tf.float32)
    labels = tf.constant(rng.integers(0, classes, rows))
    ups = (tf.fill((rows,), 2.0), tf.fill((rows,), 3.0))
    expected = None
    for _ in range(4):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(logits)
            loss = fxtf.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        start = threading.Barrier(2)

        def backward(up, tape=tape, loss=loss, start=start):
            start.wait()
            return tape.gradient(loss, logits, output_gradients=up).numpy()

        with ThreadPoolExecutor(max_workers=2) as pool:
            twice, thrice = pool.map(backward, ups)
        if expected is None:
            expected = reference_gradient(logits, labels, tf.ones(rows))
        assert_grad_close(twice, 2.0 * expected, np.float32, scale=2.0)
        assert_grad_close(thrice, 3.0 * expected, np.float32, scale=3.0)


@pytest.mark.parametrize("mode", ("eager", "graph"))
def test_gradient_is_differentiable_in_the_incoming_gradient(rng, mode):
    """d/d(upstream) of <gradient, direction> matches TensorFlow's op (graphs fold the upstream
    into the kernel, eager mode scales the kept gradient)."""
    logits = tf.constant(rng.standard_normal((5, 11)) * 3, tf.float32)
    labels = tf.constant(rng.integers(0, 11, 5))
    upstream = tf.constant(rng.choice([0.5, 1.0, 2.0], 5), tf.float32)
    direction = tf.constant(rng.standard_normal((5, 11)), tf.float32)

    def through_upstream(op, up):
        with tf.GradientTape() as outer:
            outer.watch(up)
            with tf.GradientTape() as inner:
                inner.watch(logits)
                loss = op(labels=labels, logits=logits)
            projected = tf.reduce_sum(inner.gradient(loss, logits, output_gradients=up) * direction)
        return outer.gradient(projected, up)

    run = through_upstream if mode == "eager" else tf.function(through_upstream)
    ours = run(fxtf.sparse_softmax_cross_entropy_with_logits, upstream)
    theirs = run(tf.nn.sparse_softmax_cross_entropy_with_logits, upstream)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# The core API against TensorFlow's fused op
# ----------------------------------------------------------------------------------------

FLOAT32 = np.dtype(np.float32)


def tf_loss_and_grad(logits, labels, reduce):
    """tf.nn's per-row loss, and the gradient of ``reduce(per_row)`` by GradientTape."""
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=variable)
        total = reduce(per_row)
    return per_row.numpy(), total.numpy(), tape.gradient(total, variable).numpy()


@pytest.mark.parametrize("num_classes", (7, 1000, BLOCK + 1, 2 * BLOCK + 904))
@pytest.mark.parametrize("lead_shape", ((5,), (3, 4)), ids=shape_id)
def test_tf_sparse_softmax_cross_entropy_with_logits(rng, kernel_path, lead_shape, num_classes):
    logits = random_logits(rng, lead_shape + (num_classes,), FLOAT32)
    labels = random_labels(rng, lead_shape, num_classes)

    per_row, total, tf_grad = tf_loss_and_grad(logits, labels, tf.reduce_sum)
    assert per_row.dtype == np.float32
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="none")
    assert loss.dtype == np.float32 and loss.shape == per_row.shape
    assert_loss_close(loss, per_row, FLOAT32)
    assert_grad_close(grad, tf_grad, FLOAT32, scale=1.0, rtol=PEER_GRAD_RTOL[FLOAT32])

    _, mean, tf_mean_grad = tf_loss_and_grad(logits, labels, tf.reduce_mean)
    for reduction in ("mean", "sum_over_batch_size"):
        loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction)
        assert_loss_close(loss, mean, FLOAT32)
        assert_grad_close(grad, tf_mean_grad, FLOAT32, scale=1.0 / labels.size, rtol=PEER_GRAD_RTOL[FLOAT32])
    assert_loss_close(fastxent.sparse_cross_entropy(logits, labels, reduction="sum"), total, FLOAT32)


def test_tf_edge_values(rng, kernel_path):
    """SEMANTICS' edge rows give what TensorFlow gives (finite, +inf, NaN)."""
    num_classes = 2 * BLOCK + 904
    logits = random_logits(rng, (6, num_classes), FLOAT32)
    labels = random_labels(rng, (6,), num_classes)
    logits[0, :BLOCK] = -np.inf  # some -inf, the target finite
    labels[0] = BLOCK + 3
    logits[1, labels[1]] = -np.inf  # the target -inf
    logits[2, :] = -np.inf  # everything -inf
    logits[3, -1] = np.inf  # one +inf
    logits[4, 11] = np.nan  # one NaN
    per_row, _, _ = tf_loss_and_grad(logits, labels, tf.reduce_sum)
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(per_row))
    assert np.isfinite(per_row[[0, 5]]).all() and per_row[1] == np.inf and np.isnan(per_row[2:5]).all()
    assert_loss_close(loss, per_row, FLOAT32)
