"""fastxent.keras against Keras 3's own losses: loss and gradient for every constructor option,
reduction and sample weight, Keras' quirks (softmax outputs read as logits, ignore_class masks),
serialization, and the classic tutorial model trained with each loss; and the core API against
Keras' SparseCategoricalCrossentropy (Keras maps ``from_logits=False`` to clip(p, 1e-7, 1 - 1e-7)
-> log -> softmax cross-entropy and reduces "sum_over_batch_size" by the number of rows that are
not ``ignore_class``, not by the sum of the sample weights; fastxent follows both exactly)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from conftest import (  # noqa: E402
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
import fastxent.keras as fxk  # noqa: E402
from fastxent import reference  # noqa: E402

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="fastxent.keras needs the TensorFlow backend"),
]

REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)
NUM_CLASSES = 6
# Both sides compute in float32; Keras' reduction runs on our per-row losses unchanged.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)


def assert_grad_equal(ours, theirs, rtol=1e-5):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * max(1e-3, float(np.abs(theirs).max())))


def loss_and_grad(loss_object, y_true, inputs, sample_weight, *, through_softmax=False, axis=-1):
    """The loss and its gradient with respect to ``inputs`` (logits when ``through_softmax``)."""
    inputs = tf.constant(inputs)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y_pred = keras.activations.softmax(inputs, axis=axis) if through_softmax else inputs
        loss = loss_object(y_true, y_pred, sample_weight=sample_weight)
    return loss.numpy(), tape.gradient(loss, inputs).numpy()


def sparse_case(rng, lead_shape, input_kind, ignore_class):
    logits = (rng.standard_normal(lead_shape + (NUM_CLASSES,)) * 3).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, lead_shape)
    if ignore_class is not None:
        labels.reshape(-1)[rng.random(labels.size) < 0.3] = ignore_class
    if input_kind == "probabilities":
        inputs = random_probabilities(rng, logits.shape, np.float32)
    else:
        inputs = logits
    return inputs, labels


@pytest.mark.parametrize("input_kind", ("logits", "probabilities", "softmax_output"))
@pytest.mark.parametrize("ignore_class", (None, 2, -1))
@pytest.mark.parametrize("lead_shape", ((8,), (3, 5)), ids=("batch", "sequences"))
def test_sparse_matches_keras(rng, input_kind, ignore_class, lead_shape):
    inputs, labels = sparse_case(rng, lead_shape, input_kind, ignore_class)
    from_logits = input_kind == "logits"
    through_softmax = input_kind == "softmax_output"
    if lead_shape == (8,):
        labels = labels[:, None]  # Keras squeezes a trailing axis of 1
    for reduction in REDUCTIONS:
        for sample_weight in (None, rng.uniform(0.0, 2.0, lead_shape).astype(np.float32)):
            options = dict(from_logits=from_logits, ignore_class=ignore_class, reduction=reduction)
            ours = loss_and_grad(
                fxk.SparseCategoricalCrossentropy(**options),
                labels,
                inputs,
                sample_weight,
                through_softmax=through_softmax,
            )
            theirs = loss_and_grad(
                keras.losses.SparseCategoricalCrossentropy(**options),
                labels,
                inputs,
                sample_weight,
                through_softmax=through_softmax,
            )
            assert ours[0].shape == theirs[0].shape and ours[0].dtype == theirs[0].dtype
            np.testing.assert_allclose(ours[0], theirs[0], **LOSS_TOL)
            assert_grad_equal(ours[1], theirs[1])


@pytest.mark.parametrize("mode", ("eager", "graph"))
def test_softmax_outputs_are_read_as_logits(rng, mode):
    """Keras' from_logits=False on a softmax output uses the softmax's input: with a label 40
    below the best logit the loss is 40, not the clipped log(1e-7) = 16.1 of the probabilities."""
    logits = rng.standard_normal((4, NUM_CLASSES)).astype(np.float32)
    labels = np.arange(4)
    logits[np.arange(4), labels] -= 40.0

    def run(loss_object, softmax):
        inputs = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = loss_object(labels, softmax(inputs))
        return loss, tape.gradient(loss, inputs)

    # Eager: Keras marks its softmax's output. In a graph a plain tf.nn.softmax is found by its op.
    softmax = keras.activations.softmax if mode == "eager" else tf.nn.softmax
    call = run if mode == "eager" else tf.function(run, autograph=False)
    ours = call(fxk.SparseCategoricalCrossentropy(), softmax)
    theirs = call(keras.losses.SparseCategoricalCrossentropy(), softmax)
    assert float(theirs[0]) > 39.0
    np.testing.assert_allclose(ours[0].numpy(), theirs[0].numpy(), **LOSS_TOL)
    assert_grad_equal(ours[1].numpy(), theirs[1].numpy())
    # ignore_class hides the softmax (Keras masks y_pred first): probabilities, clipped.
    masked = run(fxk.SparseCategoricalCrossentropy(ignore_class=-1), keras.activations.softmax)
    masked_keras = run(keras.losses.SparseCategoricalCrossentropy(ignore_class=-1), keras.activations.softmax)
    np.testing.assert_allclose(masked[0].numpy(), masked_keras[0].numpy(), **LOSS_TOL)
    assert float(masked_keras[0]) < 16.2


def test_sparse_against_reference(rng):
    """Keras' default reduction with ignore_class is fastxent's "sum_over_batch_size"."""
    logits, labels = sparse_case(rng, (9,), "logits", 4)
    ours = loss_and_grad(fxk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=4), labels, logits, None)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
        logits, labels, ignore_index=4, reduction="sum_over_batch_size"
    )
    np.testing.assert_allclose(ours[0], ref_loss, rtol=1e-6)
    assert_grad_equal(ours[1], ref_grad)
    # Every row ignored: 0 and a zero gradient, as Keras (no NaN).
    everything = np.full(9, 4)
    loss, grad = loss_and_grad(
        fxk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=4), everything, logits, None
    )
    assert float(loss) == 0.0 and not grad.any()


@pytest.mark.parametrize("input_kind", ("logits", "probabilities", "softmax_output"))
@pytest.mark.parametrize("label_smoothing", (0.0, 0.2))
@pytest.mark.parametrize("axis", (-1, 1))
def test_dense_matches_keras(rng, input_kind, label_smoothing, axis):
    lead_shape = (4, 3)
    labels = rng.integers(0, NUM_CLASSES, lead_shape)
    soft = rng.random(lead_shape + (NUM_CLASSES,))
    targets = np.where(
        rng.random(lead_shape + (1,)) < 0.5, np.eye(NUM_CLASSES)[labels], soft / soft.sum(-1, keepdims=True)
    ).astype(np.float32)
    logits = (rng.standard_normal(lead_shape + (NUM_CLASSES,)) * 3).astype(np.float32)
    inputs = random_probabilities(rng, logits.shape, np.float32) * 1.3 if input_kind == "probabilities" else logits
    # Classes on axis 1: Keras still smooths with the size of the last axis, so target rows no
    # longer sum to 1 and TensorFlow's gradient (softmax - targets) is not its loss's derivative.
    if axis == 1:
        targets, inputs = np.moveaxis(targets, -1, 1).copy(), np.moveaxis(inputs, -1, 1).copy()
    for reduction in ("sum_over_batch_size", "sum", None):
        sample_weight = rng.uniform(0.0, 2.0, lead_shape).astype(np.float32)
        options = dict(
            from_logits=input_kind == "logits", label_smoothing=label_smoothing, axis=axis, reduction=reduction
        )
        through_softmax = input_kind == "softmax_output"
        ours = loss_and_grad(
            fxk.CategoricalCrossentropy(**options),
            targets,
            inputs,
            sample_weight,
            through_softmax=through_softmax,
            axis=axis,
        )
        theirs = loss_and_grad(
            keras.losses.CategoricalCrossentropy(**options),
            targets,
            inputs,
            sample_weight,
            through_softmax=through_softmax,
            axis=axis,
        )
        assert ours[0].shape == theirs[0].shape
        np.testing.assert_allclose(ours[0], theirs[0], **LOSS_TOL)
        assert_grad_equal(ours[1], theirs[1], rtol=2e-5)


def test_drop_in_classes_and_names():
    loss = fxk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, reduction="sum", name="xent")
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    config = loss.get_config()
    assert config["from_logits"] is True and config["ignore_class"] == -1 and config["reduction"] == "sum"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is fxk.SparseCategoricalCrossentropy and restored.get_config() == config
    dense = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(fxk.CategoricalCrossentropy(label_smoothing=0.1))
    )
    assert type(dense) is fxk.CategoricalCrossentropy and dense.get_config()["label_smoothing"] == 0.1
    assert isinstance(fxk.get("SparseCategoricalCrossentropy"), fxk.SparseCategoricalCrossentropy)
    assert fxk.get("fastxent_categorical_crossentropy") is fxk.categorical_crossentropy
    assert fxk.get("mse") is keras.losses.get("mse")
    fxk.register()
    assert keras.losses.get("fastxent_sparse_categorical_crossentropy") is fxk.sparse_categorical_crossentropy
    assert keras.losses.get("sparse_categorical_crossentropy") is keras.losses.sparse_categorical_crossentropy


def test_errors_are_clear(rng):
    logits = rng.standard_normal((4, NUM_CLASSES)).astype(np.float32)
    with pytest.raises(ValueError, match=r"label 6 at position \(3,\) is outside the valid range \[0, 6\)"):
        fxk.SparseCategoricalCrossentropy(from_logits=True)(np.array([0, 1, 2, 6]), logits)
    with pytest.raises(ValueError, match="looks like logits: pass from_logits=True"):
        fxk.SparseCategoricalCrossentropy()(np.array([0, 1, 2, 3]), logits)
    with pytest.raises(ValueError, match=r"must have rank \(ndim\) `target.ndim - 1`"):
        fxk.sparse_categorical_crossentropy(np.zeros((4, 2)), logits)
    with pytest.raises(ValueError, match="same shape up until the last dimension"):
        fxk.sparse_categorical_crossentropy(np.zeros((3,)), logits)


def tutorial_model(seed):
    """The classic sparse-categorical-crossentropy example: 32 features, Dense(10, relu), Dense(4, softmax)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(10, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )


def fit_history(loss, labels_kind, seed=3):
    data = np.random.default_rng(seed)
    features = data.standard_normal((256, 32)).astype(np.float32)
    labels = data.integers(0, 4, 256)
    if labels_kind == "one_hot":
        labels = np.eye(4, dtype=np.float32)[labels]
    model = tutorial_model(seed)
    model.compile(optimizer="adam", loss=loss, jit_compile=False)
    history = model.fit(features, labels, epochs=4, batch_size=32, shuffle=False, verbose=0)
    return np.array(history.history["loss"]), model.evaluate(features, labels, verbose=0)


@pytest.mark.parametrize("labels_kind", ("sparse", "one_hot"))
def test_tutorial_training_matches_keras(labels_kind):
    ours_class, theirs_class = {
        "sparse": (fxk.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy),
        "one_hot": (fxk.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy),
    }[labels_kind]
    ours, our_eval = fit_history(ours_class(), labels_kind)
    theirs, their_eval = fit_history(theirs_class(), labels_kind)
    # Same float32 arithmetic up to the order of a few sums: 1e-5 relative per epoch.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    np.testing.assert_allclose(our_eval, their_eval, rtol=1e-5)
    assert theirs[-1] < theirs[0]  # it trained


def test_xla_compile_is_refused_with_a_hint():
    model = tutorial_model(0)
    model.compile(optimizer="adam", loss=fxk.SparseCategoricalCrossentropy(), jit_compile=True)
    with pytest.raises(ValueError, match="jit_compile=False"):
        model.fit(np.zeros((8, 32), np.float32), np.zeros(8), epochs=1, verbose=0)


@pytest.mark.parametrize("axis", (0, 1, -2))
def test_sparse_axis_other_than_last_raises_like_keras(rng, axis):
    """Keras on TensorFlow takes sparse labels' classes on the last axis only: both raise."""
    y_pred = rng.standard_normal((4, 5, 6)).astype(np.float32)
    y_true = rng.integers(0, 5, (4, 6))
    for loss_class in (keras.losses.SparseCategoricalCrossentropy, fxk.SparseCategoricalCrossentropy):
        with pytest.raises(ValueError, match="Only axis=-1 is currently supported"):
            loss_class(from_logits=True, axis=axis)(y_true, y_pred)
    # The last axis by its index is the last axis.
    labels = rng.integers(0, 6, (4, 5))
    np.testing.assert_allclose(
        fxk.SparseCategoricalCrossentropy(from_logits=True, axis=2)(labels, y_pred),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, axis=2)(labels, y_pred),
        rtol=1e-5,
    )


@pytest.mark.parametrize("graph", (False, True), ids=("eager", "tf.function"))
@pytest.mark.parametrize("input_kind", ("logits", "probabilities"))
def test_dense_targets_get_keras_gradient(rng, graph, input_kind):
    """Differentiating with respect to y_true (distillation, learned targets) gives Keras' gradient."""
    inputs = tf.constant(rng.standard_normal((5, 7)), tf.float32)
    targets = tf.constant(rng.random((5, 7)) * rng.choice([0.5, 1.0, 1.5], (5, 1)), tf.float32)
    upstream = tf.constant(rng.uniform(0.5, 2.0, 5), tf.float32)
    from_logits = input_kind == "logits"

    def gradients(loss_function):
        def run(x, y):
            with tf.GradientTape() as tape:
                tape.watch([x, y])
                y_pred = x if from_logits else tf.nn.softmax(x)
                loss = loss_function(y, y_pred, from_logits=from_logits, label_smoothing=0.1)
                total = tf.reduce_sum(loss * upstream)
            return tape.gradient(total, [x, y])

        return (tf.function(run) if graph else run)(inputs, targets)

    ours = gradients(fxk.categorical_crossentropy)
    theirs = gradients(keras.losses.categorical_crossentropy)
    assert ours[1] is not None
    for mine, other in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine.numpy(), other.numpy(), rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------
# The core API against Keras' SparseCategoricalCrossentropy
# ----------------------------------------------------------------------------------------

FLOAT32 = np.dtype(np.float32)

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
