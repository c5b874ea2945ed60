"""fastxent.keras against Keras' own losses on the Keras backend this process runs
(``KERAS_BACKEND`` = tensorflow, jax or torch); run by tests/test_adapter_keras_backends.py in
one subprocess per backend, many checks per process.

Usage: ``KERAS_BACKEND=jax python tests/keras_backend_checks.py [check names...]``. Prints one
line per check ("ok NAME" or "FAIL NAME" with the traceback), then "checks: N passed, M failed",
and exits 1 when any failed.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import types
import unittest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastxent.keras as fxk  # noqa: E402
from fastxent import reference  # noqa: E402

BACKEND = keras.backend.backend()
REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)
NUM_CLASSES = 6
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


def to_numpy(tensor):
    """A backend tensor as a float64 NumPy array (bfloat16 included)."""
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(tensor, "float32")), np.float64)


def value_and_grad(function, x, *, argnum=0, extra=()):
    """``function(x, *extra)`` and the gradient of its sum with respect to ``x`` (or to
    ``extra[argnum - 1]``), with the running backend's autodiff."""
    arguments = [x, *extra]
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        arguments = [jnp.asarray(a) for a in arguments]

        def total(*args):
            value = function(*args)
            return jnp.sum(value.astype(jnp.float32)), value

        (_, value), grad = jax.value_and_grad(total, argnums=argnum, has_aux=True)(*arguments)
        return to_numpy(value), to_numpy(grad)
    if BACKEND == "torch":
        import torch

        arguments = [a.detach().clone() if torch.is_tensor(a) else torch.tensor(np.asarray(a)) for a in arguments]
        arguments[argnum].requires_grad_(True)
        value = function(*arguments)
        value.float().sum().backward()
        return to_numpy(value.detach()), to_numpy(arguments[argnum].grad)
    import tensorflow as tf

    arguments = [tf.constant(a) for a in arguments]
    with tf.GradientTape() as tape:
        tape.watch(arguments[argnum])
        value = function(*arguments)
        total = tf.reduce_sum(tf.cast(value, tf.float32))
    return to_numpy(value), to_numpy(tape.gradient(total, arguments[argnum]))


def assert_grad_equal(ours, theirs, rtol=1e-5):
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * max(1e-3, float(np.abs(theirs).max(initial=0))))


def probabilities(rng, shape):
    p = rng.random(shape) + 0.05
    p[rng.random(shape) < 0.1] = 0.0  # clipped entries
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def same_outcome(ours, theirs):
    """Run both; if Keras raises, fastxent must raise the same type with the same message,
    otherwise the results must agree."""
    try:
        expected = theirs()
    except Exception as error:  # noqa: BLE001 - comparing whatever Keras raises
        try:
            ours()
        except type(error) as mine:
            assert str(mine) == str(error), (str(mine), str(error))
            return
        raise AssertionError(f"Keras raised {error!r}; fastxent did not") from None
    np.testing.assert_allclose(to_numpy(ours()), to_numpy(expected), **LOSS_TOL)


# ----------------------------------------------------------------------------------------
# Loss values and gradients against Keras' own
# ----------------------------------------------------------------------------------------


def sparse_run(loss_object, labels, inputs, weight, through_softmax):
    """The loss and its gradient with respect to ``inputs`` (logits when ``through_softmax``)."""
    if through_softmax:
        return value_and_grad(lambda x: loss_object(labels, keras.activations.softmax(x), sample_weight=weight), inputs)
    return value_and_grad(lambda x: loss_object(labels, x, sample_weight=weight), inputs)


@check
def sparse_matches_keras():
    rng = np.random.default_rng(1)
    kinds = ("logits", "probabilities") + (("softmax_output",) if BACKEND == "tensorflow" else ())
    for kind in kinds:
        for ignore_class in (None, 2, -1):
            for lead in ((8,), (3, 5)):
                logits = (rng.standard_normal(lead + (NUM_CLASSES,)) * 3).astype(np.float32)
                inputs = probabilities(rng, logits.shape) if kind == "probabilities" else logits
                labels = rng.integers(0, NUM_CLASSES, lead)
                if ignore_class is not None:
                    labels.reshape(-1)[rng.random(labels.size) < 0.3] = ignore_class
                if lead == (8,):
                    labels = labels[:, None]  # Keras squeezes a trailing axis of 1
                # Every reduction with sample weights, and Keras' default without.
                weights = rng.uniform(0.0, 2.0, lead).astype(np.float32)
                for reduction, weight in [(r, weights) for r in REDUCTIONS] + [("sum_over_batch_size", None)]:
                    options = dict(from_logits=kind == "logits", ignore_class=ignore_class, reduction=reduction)
                    case = (labels, inputs, weight, kind == "softmax_output")
                    ours = sparse_run(fxk.SparseCategoricalCrossentropy(**options), *case)
                    theirs = sparse_run(keras.losses.SparseCategoricalCrossentropy(**options), *case)
                    assert ours[0].shape == theirs[0].shape, (ours[0].shape, theirs[0].shape)
                    np.testing.assert_allclose(ours[0], theirs[0], **LOSS_TOL)
                    assert_grad_equal(ours[1], theirs[1])


@check
def sparse_against_reference_and_edges():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((9, NUM_CLASSES)) * 3).astype(np.float32)
    logits[0, 3] = -np.inf  # a class with probability 0
    logits[1] = 1e30 * np.sign(logits[1])  # huge magnitudes
    labels = rng.integers(0, NUM_CLASSES, 9)
    labels[0] = 2
    labels[[4, 7]] = 4
    loss_object = fxk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=4)
    loss, grad = value_and_grad(lambda x: loss_object(labels, x), logits)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
        logits, labels, ignore_index=4, reduction="sum_over_batch_size"
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_grad_equal(grad, ref_grad)
    # Every row ignored: 0 and a zero gradient, as Keras (no NaN).
    loss, grad = value_and_grad(lambda x: loss_object(np.full(9, 4), x), logits)
    assert float(loss) == 0.0 and not grad.any()
    # One class: loss 0 for every row.
    one = fxk.sparse_categorical_crossentropy(np.zeros(3), rng.standard_normal((3, 1)).astype(np.float32), True)
    np.testing.assert_array_equal(to_numpy(one), np.zeros(3))
    # Zero rows.
    empty = fxk.sparse_categorical_crossentropy(np.zeros(0), np.zeros((0, 5), np.float32), from_logits=True)
    assert tuple(empty.shape) == (0,)


@check
def sparse_axis_like_keras():
    """Keras' own answer for a class axis other than the last (PyTorch: computed; JAX: its
    shape check; TensorFlow: refused): fastxent gives the same."""
    rng = np.random.default_rng(3)
    y_pred = rng.standard_normal((4, 5, 6)).astype(np.float32)
    for axis in (0, 1, 2, -1, -2):
        shape = tuple(d for i, d in enumerate(y_pred.shape) if i != axis % 3)
        labels = rng.integers(0, y_pred.shape[axis], shape)
        for from_logits in (True, False):
            inputs = y_pred if from_logits else np.abs(y_pred)
            same_outcome(
                lambda a=axis, f=from_logits, x=inputs, y=labels: fxk.SparseCategoricalCrossentropy(
                    from_logits=f, axis=a, reduction=None
                )(y, x),
                lambda a=axis, f=from_logits, x=inputs, y=labels: keras.losses.SparseCategoricalCrossentropy(
                    from_logits=f, axis=a, reduction=None
                )(y, x),
            )


@check
def dense_matches_keras():
    rng = np.random.default_rng(4)
    lead = (4, 3)
    for kind in ("logits", "probabilities"):
        for smoothing in (0.0, 0.2):
            for axis in (-1, 1):
                labels = rng.integers(0, NUM_CLASSES, lead)
                soft = rng.random(lead + (NUM_CLASSES,))
                targets = np.where(
                    rng.random(lead + (1,)) < 0.5, np.eye(NUM_CLASSES)[labels], soft / soft.sum(-1, keepdims=True)
                ).astype(np.float32)
                logits = (rng.standard_normal(lead + (NUM_CLASSES,)) * 3).astype(np.float32)
                inputs = probabilities(rng, logits.shape) * 1.3 if kind == "probabilities" else logits
                if axis == 1:
                    targets, inputs = np.moveaxis(targets, -1, 1).copy(), np.moveaxis(inputs, -1, 1).copy()
                for reduction in ("sum_over_batch_size", "sum", None):
                    weight = rng.uniform(0.0, 2.0, lead).astype(np.float32)
                    options = dict(
                        from_logits=kind == "logits", label_smoothing=smoothing, axis=axis, reduction=reduction
                    )

                    def run(loss_class, options=options, weight=weight, targets=targets, inputs=inputs):
                        loss_object = loss_class(**options)
                        return value_and_grad(lambda x: loss_object(targets, x, sample_weight=weight), inputs)

                    ours = run(fxk.CategoricalCrossentropy)
                    theirs = run(keras.losses.CategoricalCrossentropy)
                    assert ours[0].shape == theirs[0].shape
                    np.testing.assert_allclose(ours[0], theirs[0], **LOSS_TOL)
                    assert_grad_equal(ours[1], theirs[1], rtol=2e-5)


@check
def dense_targets_get_keras_gradient():
    """Differentiating with respect to y_true (distillation) gives Keras' gradient."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    targets = (rng.random((5, 7)) * rng.choice([0.5, 1.0, 1.5], (5, 1))).astype(np.float32)
    for from_logits in (True, False):
        x = logits if from_logits else probabilities(rng, logits.shape)

        def run(function, x=x, from_logits=from_logits):
            return value_and_grad(
                lambda t, x: function(t, x, from_logits=from_logits, label_smoothing=0.1), targets, extra=(x,)
            )

        ours = run(fxk.categorical_crossentropy)
        theirs = run(keras.losses.categorical_crossentropy)
        np.testing.assert_allclose(ours[0], theirs[0], **LOSS_TOL)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=2e-5, atol=2e-6)


@check
def half_precision_as_accurate_as_keras():
    """bfloat16 (a loss with dtype "bfloat16" or the "mixed_bfloat16" policy, whose compute dtype
    it is): same dtype as Keras' result, and per row at least as close to the float64 loss of the
    same bfloat16 values as Keras is (plus 1e-5 of float32 compute error)."""
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((64, 1000)) * 4).astype(np.float32)
    # Labels below 256: the loss converts them to its dtype, and bfloat16 holds those exactly.
    labels = rng.integers(0, 256, 64)
    rounded = to_numpy(keras.ops.cast(logits, "bfloat16"))
    exact = reference.sparse_cross_entropy(rounded, labels, reduction="none")
    targets = np.eye(1000, dtype=np.float32)[labels]
    for dtype in ("bfloat16", "mixed_bfloat16"):
        for ours_class, keras_class, y in (
            (fxk.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy, labels),
            (fxk.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy, targets),
        ):
            ours = ours_class(from_logits=True, reduction=None, dtype=dtype)(y, logits)
            theirs = keras_class(from_logits=True, reduction=None, dtype=dtype)(y, logits)
            assert keras.backend.standardize_dtype(ours.dtype) == keras.backend.standardize_dtype(theirs.dtype)
            assert keras.backend.standardize_dtype(ours.dtype) == "bfloat16"
            ours_error = np.abs(to_numpy(ours) - exact)
            theirs_error = np.abs(to_numpy(theirs) - exact)
            assert np.all(ours_error <= theirs_error + 1e-5 * np.abs(exact) + 1e-6), (
                ours_error.max(),
                theirs_error.max(),
            )
            # And the gradient comes back in bfloat16, close to the float64 one.
            loss_object = ours_class(from_logits=True, dtype=dtype)
            _, grad = value_and_grad(lambda x, o=loss_object, y=y: o(y, x), keras.ops.cast(logits, "bfloat16"))
            _, ref_grad = reference.sparse_cross_entropy_with_grad(rounded, labels, reduction="sum_over_batch_size")
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-2, atol=1e-2 * np.abs(ref_grad).max())


@check
def keras_losses_test_suite():
    """Keras' own losses_test.py cases for the two losses, with fastxent's classes and functions
    in place of Keras' (tests Keras marks skipped for this backend are skipped)."""
    from keras.src.losses import losses as keras_losses
    from keras.src.losses import losses_test

    patched = types.ModuleType("losses")
    patched.__dict__.update(keras_losses.__dict__)
    patched.SparseCategoricalCrossentropy = fxk.SparseCategoricalCrossentropy
    patched.CategoricalCrossentropy = fxk.CategoricalCrossentropy
    patched.sparse_categorical_crossentropy = fxk.sparse_categorical_crossentropy
    patched.categorical_crossentropy = fxk.categorical_crossentropy
    original = losses_test.losses
    losses_test.losses = patched
    try:
        suite = unittest.TestSuite()
        names = []
        for case in (losses_test.SparseCategoricalCrossentropyTest, losses_test.CategoricalCrossentropyTest):
            for name in unittest.TestLoader().getTestCaseNames(case):
                marks = getattr(getattr(case, name), "pytestmark", [])
                if any(m.name == "skipif" and m.args and m.args[0] for m in marks):
                    continue
                suite.addTest(case(name))
                names.append(name)
        result = unittest.TextTestRunner(stream=open(os.devnull, "w"), verbosity=0).run(suite)
    finally:
        losses_test.losses = original
    problems = [f"{test}: {text}" for test, text in result.failures + result.errors]
    assert not problems, "\n".join(problems)
    assert result.testsRun >= 20, result.testsRun
    print(f"   Keras losses_test.py: {result.testsRun} cases passed")


@check
def classes_names_and_serialization():
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
    layer = fxk.LinearCrossEntropy(11, ignore_index=-1, class_weight=np.ones(11), reduction="sum")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is fxk.LinearCrossEntropy and clone.get_config() == layer.get_config()


@check
def errors_are_clear():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((4, NUM_CLASSES)).astype(np.float32)
    try:
        fxk.SparseCategoricalCrossentropy(from_logits=True)(np.array([0, 1, 2, 6]), logits)
    except Exception as error:  # noqa: BLE001 - the backends wrap the kernel's error differently
        assert "label 6 at position (3,) is outside the valid range [0, 6)" in str(error), str(error)
    else:
        raise AssertionError("a label outside [0, C) did not raise")
    for bad_axis in (True, 1.0):
        try:
            fxk.sparse_categorical_crossentropy(np.zeros(4), logits, axis=bad_axis)
        except ValueError as error:
            assert "`axis` must be of type `int`" in str(error)
        else:
            raise AssertionError("a bad axis did not raise")
    same_outcome(
        lambda: fxk.sparse_categorical_crossentropy(np.zeros((4, 2)), logits),
        lambda: keras.losses.sparse_categorical_crossentropy(np.zeros((4, 2)), logits),
    )
    same_outcome(
        lambda: fxk.sparse_categorical_crossentropy(np.zeros(3), logits),
        lambda: keras.losses.sparse_categorical_crossentropy(np.zeros(3), logits),
    )
    same_outcome(
        lambda: fxk.categorical_crossentropy(np.zeros((4, 2)), logits, from_logits=True),
        lambda: keras.losses.categorical_crossentropy(np.zeros((4, 2)), logits, from_logits=True),
    )


# ----------------------------------------------------------------------------------------
# model.fit, evaluate, predict
# ----------------------------------------------------------------------------------------


def tutorial_model(seed, output_activation="softmax"):
    """The classic example: 32 features, Dense(10, relu), Dense(4, softmax)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(10, activation="relu"),
            keras.layers.Dense(4, activation=output_activation),
        ]
    )


def fit_run(loss, labels_kind, jit_compile, output_activation, seed=3):
    data = np.random.default_rng(seed)
    features = data.standard_normal((128, 32)).astype(np.float32)
    labels = data.integers(0, 4, 128)
    if labels_kind == "one_hot":
        labels = np.eye(4, dtype=np.float32)[labels]
    model = tutorial_model(seed, output_activation)
    model.compile(optimizer="adam", loss=loss, jit_compile=jit_compile)
    history = model.fit(features, labels, epochs=3, batch_size=32, shuffle=False, verbose=0)
    evaluation = model.evaluate(features, labels, verbose=0)
    # The prediction involves no loss: only where it is cheap (torch.compile compiles it apart).
    prediction = None if jit_compile is True else model.predict(features[:16], verbose=0)
    return np.array(history.history["loss"]), evaluation, prediction


@check
def fit_matches_keras():
    """jit_compile at its default (JAX: XLA; TensorFlow on a CPU and PyTorch: off)."""
    for jit_compile in ("auto",):
        for labels_kind, ours_class, keras_class in (
            ("sparse", fxk.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy),
            ("one_hot", fxk.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy),
        ):
            for from_logits in (False, True):
                activation = None if from_logits else "softmax"
                ours = fit_run(ours_class(from_logits=from_logits), labels_kind, jit_compile, activation)
                theirs = fit_run(keras_class(from_logits=from_logits), labels_kind, jit_compile, activation)
                np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
                np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5)
                np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-4, atol=1e-6)
                assert theirs[0][-1] < theirs[0][0]  # it trained


def sequence_run(loss, jit_compile, seed=5, vocabulary=50):
    """An embedding (mask_zero: padded steps carry a Keras mask into the loss) and a softmax
    head over a sequence, trained with sample weights and ignore_class."""
    data = np.random.default_rng(seed)
    tokens = data.integers(1, vocabulary, (48, 7))
    tokens[:, 5:][data.random((48, 2)) < 0.5] = 0  # padding
    labels = data.integers(0, vocabulary, (48, 7))
    labels[data.random((48, 7)) < 0.1] = -1  # ignore_class
    weights = data.uniform(0.5, 1.5, (48, 7)).astype(np.float32)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((7,), dtype="int32"),
            keras.layers.Embedding(vocabulary, 16, mask_zero=True),
            keras.layers.Dense(vocabulary),
        ]
    )
    model.compile(optimizer="adam", loss=loss, jit_compile=jit_compile)
    history = model.fit(tokens, labels, sample_weight=weights, epochs=3, batch_size=16, shuffle=False, verbose=0)
    return np.array(history.history["loss"]), model.evaluate(tokens, labels, sample_weight=weights, verbose=0)


@check
def masked_weighted_sequence_fit_matches_keras():
    for jit_compile in ("auto",):
        ours = sequence_run(fxk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1), jit_compile)
        theirs = sequence_run(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1), jit_compile
        )
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5)
        assert theirs[0][-1] < theirs[0][0]


@check
def mixed_bfloat16_fit():
    """Under the mixed_bfloat16 policy (bfloat16 layers, float32 loss) the history follows Keras'
    to bfloat16's precision and the model trains."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        for jit_compile in ("auto",):
            ours = fit_run(fxk.SparseCategoricalCrossentropy(from_logits=True), "sparse", jit_compile, None)
            theirs = fit_run(keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse", jit_compile, None)
            np.testing.assert_allclose(ours[0], theirs[0], rtol=2e-2)
            assert ours[0][-1] < ours[0][0]
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------------------
# LinearCrossEntropy
# ----------------------------------------------------------------------------------------


def linear_run(fused, jit_compile, *, trainable=True, hidden_size=12, vocabulary=40, seed=9):
    """Hidden (N, T, H) -> Dense(H) -> head; the head is LinearCrossEntropy (fused) or Dense +
    Keras' loss from logits, with the same initial weights. Returns the loss history and the
    head's final kernel."""
    data = np.random.default_rng(seed)
    features = data.standard_normal((64, 3, hidden_size)).astype(np.float32)
    labels = data.integers(0, vocabulary, (64, 3))
    keras.utils.set_random_seed(seed)
    hidden_in = keras.Input((3, hidden_size))
    hidden = keras.layers.Dense(hidden_size, activation="tanh")(hidden_in)
    if fused:
        labels_in = keras.Input((3,), dtype="int32")
        head = fxk.LinearCrossEntropy(vocabulary, trainable=trainable)
        model = keras.Model([hidden_in, labels_in], head([hidden, labels_in]))
        model.compile(optimizer="sgd", loss=None, jit_compile=jit_compile)
        history = model.fit([features, labels], epochs=3, batch_size=16, shuffle=False, verbose=0)
        evaluation = None if jit_compile is True else model.evaluate([features, labels], verbose=0)
    else:
        head = keras.layers.Dense(vocabulary, trainable=trainable)
        model = keras.Model(hidden_in, head(hidden))
        model.compile(
            optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile
        )
        history = model.fit(features, labels, epochs=3, batch_size=16, shuffle=False, verbose=0)
        evaluation = None if jit_compile is True else model.evaluate(features, labels, verbose=0)
    return np.array(history.history["loss"]), evaluation, [np.asarray(w) for w in head.get_weights()]


def assert_linear_runs_agree(ours, theirs):
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    if theirs[1] is not None:
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5)
    for mine, other in zip(ours[2], theirs[2], strict=True):
        np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-6)
    assert ours[0][-1] < ours[0][0]


@check
def linear_layer_trains_like_dense():
    assert_linear_runs_agree(linear_run(True, "auto"), linear_run(False, "auto"))
    # A frozen head: its weights do not move, the rest trains as with Dense.
    frozen = linear_run(True, False, trainable=False)
    frozen_dense = linear_run(False, False, trainable=False)
    np.testing.assert_allclose(frozen[0], frozen_dense[0], rtol=1e-5)
    for mine, other in zip(frozen[2], frozen_dense[2], strict=True):
        np.testing.assert_array_equal(mine, other)


@check
def linear_layer_options_against_reference():
    """The layer's reductions and options on every backend against the float64 composition."""
    rng = np.random.default_rng(10)
    hidden = rng.standard_normal((2, 5, 8)).astype(np.float32)
    labels = rng.integers(0, 30, (2, 5))
    labels[0, :2] = -1
    class_weight = rng.uniform(0.5, 2.0, 30)
    for reduction in ("sum_over_batch_size", "mean", "sum"):
        for options in (dict(), dict(class_weight=class_weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)):
            layer = fxk.LinearCrossEntropy(30, ignore_index=-1, reduction=reduction, **options)
            loss = layer([hidden, labels], training=False)
            kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
            expected = reference.sparse_cross_entropy(
                hidden.astype(np.float64) @ kernel + bias, labels, ignore_index=-1, reduction=reduction, **options
            )
            np.testing.assert_allclose(to_numpy(loss), expected, rtol=2e-5)
    # Nothing counted: 0, not NaN.
    layer = fxk.LinearCrossEntropy(30, ignore_index=-1, reduction="mean")
    assert float(to_numpy(layer([hidden, np.full((2, 5), -1)]))) == 0.0


@check
def jit_compile_forced_on():
    """model.compile(jit_compile=True): JAX compiles the step with XLA (the kernel is a custom
    call), PyTorch with torch.compile (the kernel runs between the compiled graphs). The loss
    and LinearCrossEntropy give Keras' history; TensorFlow's XLA is refused with a hint."""
    if BACKEND == "tensorflow":
        model = tutorial_model(0)
        model.compile(optimizer="adam", loss=fxk.SparseCategoricalCrossentropy(), jit_compile=True)
        try:
            model.fit(np.zeros((8, 32), np.float32), np.zeros(8), epochs=1, verbose=0)
        except ValueError as error:
            assert "jit_compile=False" in str(error)
        else:
            raise AssertionError("XLA compiled a host call")
        return
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    ours = fit_run(fxk.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1), "sparse", True, None)
    theirs = fit_run(keras_loss, "sparse", True, None)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5)
    assert_linear_runs_agree(linear_run(True, True), linear_run(False, True))


def main(names):
    selected = names or list(CHECKS)
    failed = 0
    for name in selected:
        start = time.perf_counter()
        try:
            CHECKS[name]()
        except Exception:  # noqa: BLE001 - every failure is reported, then the process fails
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"ok {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"checks on {BACKEND}: {len(selected) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
