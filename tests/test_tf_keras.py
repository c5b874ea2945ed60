"""fastxent against TensorFlow's fused op and Keras' SparseCategoricalCrossentropy, float32.

Keras maps ``from_logits=False`` to clip(p, 1e-7, 1 - 1e-7) -> log -> softmax cross-entropy and
reduces "sum_over_batch_size" by the number of rows that are not ``ignore_class`` (not by the
sum of the sample weights); fastxent follows both exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from conftest import (  # noqa: E402
    BLOCK,
    PEER_GRAD_RTOL,
    assert_grad_close,
    assert_loss_close,
    gradient_scale,
    random_labels,
    random_logits,
    random_probabilities,
    random_sample_weight,
    shape_id,
)

import fastxent  # noqa: E402

pytestmark = pytest.mark.peers

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


KERAS_REDUCTIONS = ("sum_over_batch_size", "sum", "none")


@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS)
@pytest.mark.parametrize("weighted", (False, True), ids=("unweighted", "sample_weight"))
@pytest.mark.parametrize("ignore_class", (None, -1, 3))
@pytest.mark.parametrize("from_logits", (True, False), ids=("logits", "probabilities"))
@pytest.mark.parametrize("lead_shape", ((8,), (2, 3)), ids=shape_id)
def test_keras_sparse_categorical_crossentropy(rng, lead_shape, from_logits, ignore_class, weighted, reduction):
    num_classes = 1000
    shape = lead_shape + (num_classes,)
    inputs = random_logits(rng, shape, FLOAT32) if from_logits else random_probabilities(rng, shape, FLOAT32)
    labels = random_labels(rng, lead_shape, num_classes)
    if ignore_class is not None:
        labels.reshape(-1)[[1, -1]] = ignore_class
    sample_weight = random_sample_weight(rng, lead_shape).astype(np.float32) if weighted else None

    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, ignore_class=ignore_class, reduction=reduction
    )
    variable = tf.Variable(inputs)
    with tf.GradientTape() as tape:
        expected = keras_loss(labels, variable, sample_weight=sample_weight)
        total = tf.reduce_sum(expected)
    expected_grad = tape.gradient(total, variable).numpy()
    expected = expected.numpy()

    options = dict(from_logits=from_logits, ignore_index=ignore_class, sample_weight=sample_weight, reduction=reduction)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(inputs, labels, **options)
    assert loss.dtype == expected.dtype == np.float32
    assert loss.shape == expected.shape
    assert_loss_close(loss, expected, FLOAT32)
    assert_loss_close(fastxent.sparse_cross_entropy(inputs, labels, **options), expected, FLOAT32)
    assert_grad_close(
        grad, expected_grad, FLOAT32, scale=gradient_scale(labels, **options), rtol=PEER_GRAD_RTOL[FLOAT32]
    )


def test_keras_zero_probability_scores_16_118():
    probs = np.array([[0.0, 0.5, 0.5]], dtype=np.float32)
    expected = keras.losses.SparseCategoricalCrossentropy(reduction="sum")(np.array([0]), probs).numpy()
    loss = fastxent.sparse_cross_entropy(probs, np.array([0]), from_logits=False, reduction="sum")
    assert round(float(expected), 3) == round(float(loss), 3) == 16.118


def test_keras_all_rows_ignored_gives_zero(rng):
    logits = random_logits(rng, (4, 10), FLOAT32)
    labels = np.full(4, -1)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)(labels, logits)
    loss = fastxent.sparse_cross_entropy(logits, labels, ignore_index=-1, reduction="sum_over_batch_size")
    assert float(expected) == float(loss) == 0.0
