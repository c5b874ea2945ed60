"""Keras 3 drop-in losses on fastxent's fused kernel (TensorFlow backend).

``SparseCategoricalCrossentropy`` and ``CategoricalCrossentropy`` are Keras' own classes (same
constructor, config, reduction, ``sample_weight`` and mask handling: ``isinstance`` checks still
pass) with the per-row loss computed by fastxent, its gradient from the same fused call. The
module-level ``sparse_categorical_crossentropy`` and ``categorical_crossentropy`` mirror
``keras.losses``' functions.

``LinearCrossEntropy`` is an output layer (Dense's kernel and bias) that adds the fused linear +
cross-entropy loss (``fastxent.linear_cross_entropy``) without materialising the logits.

Keras' quirks are reproduced:
* With ``from_logits=False``, a ``y_pred`` that comes straight out of a softmax (Keras marks it,
  or in a graph its op is ``Softmax``) is replaced by the softmax's input and treated as logits,
  so ``Dense(n, activation="softmax")`` trains on exact logits, not on clipped probabilities.
  ``ignore_class`` turns that off (Keras masks ``y_pred`` first, which hides the softmax).
* Otherwise probabilities are clipped to [1e-7, 1 - 1e-7] (the sparse loss takes the log and a
  softmax; the dense one first divides each row by its sum).
* ``ignore_class`` rows get loss 0 and a Keras mask, so "sum_over_batch_size" divides by the
  number of rows that are not ignored (0 when there are none).
* Labels arrive in the loss dtype (float32) and are truncated to integers, as Keras does.

Deviations, on purpose: a label outside [0, C) raises fastxent's ``ValueError`` (TensorFlow
raises ``InvalidArgumentError``, or returns NaN on a GPU); a negative "probability" with
``from_logits=False`` raises ``ValueError`` (Keras returns a meaningless loss); a class whose
dense target is 0 contributes 0 even where its logit is -inf (Keras: NaN); the dense loss gives
no gradient to ``y_true``.

``model.fit`` works with ``jit_compile=False`` (the default on CPU-only machines): the kernel
runs as a host call that XLA cannot compile. Import this module explicitly:
``import fastxent.keras``.
"""

from __future__ import annotations

import functools
import warnings

import keras
import numpy as np
import tensorflow as tf

from fastxent._linear_api import linear_cross_entropy_with_grad
from fastxent.tf import dense_per_row, host_call, sparse_per_row

__all__ = [
    "CategoricalCrossentropy",
    "LinearCrossEntropy",
    "SparseCategoricalCrossentropy",
    "categorical_crossentropy",
    "get",
    "register",
    "sparse_categorical_crossentropy",
]

# Ignored rows are handed to the kernel with this label: no real label can take it.
_IGNORED = np.iinfo(np.int64).min


def _require_tensorflow_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            f"fastxent.keras runs on Keras' TensorFlow backend; this Keras uses {keras.backend.backend()!r}. "
            "With the torch or jax backend use fastxent.torch or fastxent.jax in a custom loss."
        )


def _keras_logits(output, from_logits: bool, fn_name: str):
    """Keras' ``_get_logits``: the softmax's input when ``output`` comes straight out of a softmax."""
    if hasattr(output, "_keras_logits"):
        found = output._keras_logits
    elif (
        hasattr(output, "op")
        and not isinstance(output, (tf.__internal__.EagerTensor, tf.Variable))
        and output.op.type == "Softmax"
    ):
        if len(output.op.inputs) != 1:
            raise ValueError("Expected 1 input for Softmax.")
        found = output.op.inputs[0]
    else:
        return output, from_logits
    if from_logits:
        warnings.warn(
            f'"`{fn_name}` received `from_logits=True`, but the `output` argument was produced by a '
            "Softmax activation and thus does not represent logits. Was this intended?",
            stacklevel=3,
        )
    return found, True


def _check_axis(axis) -> None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}")


@tf.autograph.experimental.do_not_convert
def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """``keras.losses.sparse_categorical_crossentropy`` on fastxent's fused kernel.

    Returns the per-row losses (``y_pred``'s shape without ``axis``), with a Keras mask of the
    rows that are not ``ignore_class``.
    """
    _require_tensorflow_backend()
    _check_axis(axis)
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.convert_to_tensor(y_true)
    if axis != -1 and axis != len(y_pred.shape) - 1:
        # Keras (TensorFlow backend) takes the classes on the last axis only, and says so.
        raise ValueError(f"Only axis=-1 is currently supported. Received: axis={axis}")
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[axis] == 1:
        y_true = tf.squeeze(y_true, axis=axis)
    rank = len(y_pred.shape)
    if rank < 1:
        raise ValueError(f"Argument `output` must be at least rank 1. Received: output.shape={y_pred.shape}")
    class_axis = axis % rank
    row_shape = y_pred.shape[:class_axis] + y_pred.shape[class_axis + 1 :]
    if len(y_true.shape) != rank - 1 or not y_true.shape.is_compatible_with(row_shape):
        raise ValueError(
            "Arguments `target` and `output` must have the same shape up until the class dimension: "
            f"target.shape={y_true.shape}, output.shape={y_pred.shape}"
        )

    labels = tf.cast(y_true, tf.int64)
    if ignore_class is None:
        logits, logits_given = _keras_logits(y_pred, from_logits, "sparse_categorical_crossentropy")
        return sparse_per_row(logits, labels, from_logits=logits_given, axis=class_axis)
    valid = tf.not_equal(tf.cast(y_true, y_pred.dtype), tf.cast(ignore_class, y_pred.dtype))
    labels = tf.where(valid, labels, tf.constant(_IGNORED, tf.int64))
    losses = sparse_per_row(y_pred, labels, from_logits=from_logits, ignore_index=int(_IGNORED), axis=class_axis)
    # Keras' reduction reads this mask: "sum_over_batch_size" divides by the rows kept.
    losses._keras_mask = valid
    return losses


@tf.autograph.experimental.do_not_convert
def categorical_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """``keras.losses.categorical_crossentropy`` on fastxent's fused kernel (per-row losses)."""
    _require_tensorflow_backend()
    _check_axis(axis)
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    if y_pred.shape[-1] == 1:
        warnings.warn(
            "In loss categorical_crossentropy, expected y_pred.shape to be (batch_size, num_classes) "
            f"with num_classes > 1. Received: y_pred.shape={y_pred.shape}. Consider using "
            "'binary_crossentropy' if you only have 2 classes.",
            SyntaxWarning,
            stacklevel=2,
        )
    if len(y_true.shape) < 1:
        raise ValueError(
            "Arguments `target` and `output` must be at least rank 1. "
            f"Received: target.shape={y_true.shape}, output.shape={y_pred.shape}"
        )
    if len(y_true.shape) != len(y_pred.shape) or not y_true.shape.is_compatible_with(y_pred.shape):
        raise ValueError(
            "Arguments `target` and `output` must have the same shape. "
            f"Received: target.shape={y_true.shape}, output.shape={y_pred.shape}"
        )
    class_axis = axis % len(y_pred.shape)
    smoothing = float(label_smoothing) if label_smoothing else 0.0
    if smoothing and class_axis != len(y_pred.shape) - 1:
        # Keras smooths with the size of the last axis whatever ``axis`` is: do exactly that.
        num_classes = tf.cast(tf.shape(y_true)[-1], y_pred.dtype)
        y_true = y_true * (1.0 - smoothing) + smoothing / num_classes
        smoothing = 0.0
    logits, logits_given = _keras_logits(y_pred, from_logits, "categorical_crossentropy")
    return dense_per_row(logits, y_true, from_logits=logits_given, label_smoothing=smoothing, axis=class_axis)


@keras.saving.register_keras_serializable(package="fastxent")
class SparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """``keras.losses.SparseCategoricalCrossentropy`` whose per-row loss and gradient come from
    fastxent's fused kernel. Same arguments: ``from_logits=False``, ``ignore_class=None``,
    ``reduction="sum_over_batch_size"``, ``axis=-1``, ``name``, ``dtype``."""

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction="sum_over_batch_size",
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(
            from_logits=from_logits, ignore_class=ignore_class, reduction=reduction, axis=axis, name=name, dtype=dtype
        )
        self.axis = axis
        self.fn = sparse_categorical_crossentropy

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config


@keras.saving.register_keras_serializable(package="fastxent")
class CategoricalCrossentropy(keras.losses.CategoricalCrossentropy):
    """``keras.losses.CategoricalCrossentropy`` whose per-row loss and gradient come from
    fastxent's fused kernel. Same arguments: ``from_logits=False``, ``label_smoothing=0.0``,
    ``axis=-1``, ``reduction="sum_over_batch_size"``, ``name``, ``dtype``."""

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction="sum_over_batch_size",
        name="categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )
        self.fn = categorical_crossentropy


# Names ``get`` resolves to fastxent's losses; everything else goes to ``keras.losses.get``.
_NAMES = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "SparseCategoricalCrossentropy": SparseCategoricalCrossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "CategoricalCrossentropy": CategoricalCrossentropy,
}
_PREFIX = "fastxent_"


def get(identifier):
    """``keras.losses.get`` that resolves the cross-entropy names to fastxent's versions.

    "sparse_categorical_crossentropy", "SparseCategoricalCrossentropy", "categorical_crossentropy",
    "CategoricalCrossentropy" (optionally prefixed "fastxent_") give fastxent's; a class is
    instantiated with its defaults, as Keras does. Other identifiers go to ``keras.losses.get``.
    """
    if isinstance(identifier, str):
        found = _NAMES.get(identifier[len(_PREFIX) :] if identifier.startswith(_PREFIX) else identifier)
        if found is not None:
            return found() if isinstance(found, type) else found
    return keras.losses.get(identifier)


def register() -> None:
    """Make the "fastxent_"-prefixed names work wherever Keras takes a loss name, e.g.
    ``model.compile(loss="fastxent_sparse_categorical_crossentropy")``.

    Keras resolves loss names from one table of its built-in losses; this adds fastxent's four
    names to it (Keras' own names keep meaning Keras' losses).
    """
    from keras.src import losses as keras_losses

    for name, value in _NAMES.items():
        keras_losses.ALL_OBJECTS_DICT[_PREFIX + name] = value


# ----------------------------------------------------------------------------------------
# The output layer with its loss: linear + cross-entropy, fused
# ----------------------------------------------------------------------------------------

_LINEAR_REDUCTIONS = ("sum_over_batch_size", "mean", "sum")


@tf.autograph.experimental.do_not_convert
def _fused_linear_loss(hidden, kernel, bias, labels, options, *, want_grads, want_head_grads):
    """The reduced loss of ``hidden @ kernel + bias`` against ``labels`` (kernel (H, V), Dense's
    layout), differentiable in hidden, kernel and bias; computed by
    ``fastxent.linear_cross_entropy_with_grad`` without the logits.

    With ``want_grads`` the host call computes the loss and the gradients together and the
    backward scales them by the incoming scalar; otherwise the loss alone, and a backward (if
    one is asked for after all) computes the gradients then. ``want_head_grads`` False skips
    the kernel and bias gradients (a frozen layer: no weight-gradient GEMM).
    """
    loss_dtype = tf.float64 if hidden.dtype == tf.float64 else tf.float32
    with_bias = bias is not None

    def compute(wants, hidden_array, kernel_array, labels_array, *bias_array):
        # The kernel's (H, V) memory read as the (V, H) weight the linear API takes.
        loss, grad_hidden, grad_weight, grad_bias = linear_cross_entropy_with_grad(
            hidden_array,
            kernel_array.T,
            labels_array,
            bias=bias_array[0] if with_bias else None,
            hidden_grad=wants,
            weight_grad=wants and want_head_grads,
            bias_grad=wants and want_head_grads,
            **options,
        )
        if not wants:
            return (loss,)
        grad_kernel = np.zeros(kernel_array.shape, kernel_array.dtype) if grad_weight is None else grad_weight.T
        results = [loss, grad_hidden, np.ascontiguousarray(grad_kernel)]
        if with_bias:
            results.append(np.zeros(bias_array[0].shape, bias_array[0].dtype) if grad_bias is None else grad_bias)
        return results

    def host(wants, tensors):
        out_dtypes = [loss_dtype] + ([t.dtype for t in tensors if t is not labels] if wants else [])
        out_shapes = [tf.TensorShape([])] + ([t.shape for t in tensors if t is not labels] if wants else [])
        return host_call(functools.partial(compute, wants), tensors, out_dtypes, out_shapes)

    @tf.custom_gradient
    def fused(hidden_in, kernel_in, *bias_in):
        tensors = [hidden_in, kernel_in, labels, *bias_in]
        outputs = host(want_grads, tensors)
        loss = outputs[0]

        def backward(upstream):
            grads = outputs[1:] if want_grads else host(True, tensors)[1:]
            return [g * tf.cast(upstream, g.dtype) for g in grads]

        return loss, backward

    return fused(hidden, kernel, *([bias] if with_bias else []))


@keras.saving.register_keras_serializable(package="fastxent")
class LinearCrossEntropy(keras.layers.Layer):
    """An output layer and its loss in one: ``Dense(num_classes)`` + sparse cross-entropy from
    logits, computed by fastxent without the (N, num_classes) logits.

    The layer owns the kernel ``(H, num_classes)`` and bias ``(num_classes,)`` exactly as
    ``keras.layers.Dense(num_classes)`` does (same names, shapes and initializers:
    ``set_weights``/``get_weights`` carry over both ways). Called as ``layer([hidden, labels])``
    with hidden ``(..., H)`` and integer labels ``(...)``, it returns the reduced scalar loss and
    adds it to the model with ``add_loss``, so a model whose output is this layer trains with
    ``model.compile(optimizer, loss=None, jit_compile=False)`` and ``model.fit([hidden,
    labels])``. Design choice: the loss, not the logits, is the layer's output (returning logits
    would materialise them); per-token losses are not offered, so the backward only scales the
    gradients the forward computed (one fused call per step).

    In training (``training`` not False) the forward computes the loss and the gradients of
    hidden, kernel and bias in one call (kernel and bias only when the layer is trainable: a
    frozen head costs no weight-gradient GEMM); in inference the loss alone. Runs through
    ``tf.py_function`` inside ``model.fit`` (TensorFlow backend only, ``jit_compile=False``).

    Args:
        num_classes: V, the vocabulary size.
        use_bias: whether the layer has a bias.
        kernel_initializer, bias_initializer: as Dense's.
        ignore_index, label_smoothing, class_weight ((V,) values), z_loss, softcap: as in
            ``fastxent.linear_cross_entropy``.
        reduction: "sum_over_batch_size" (Keras' default: divided by the rows not ignored),
            "mean" (divided by the summed class weights of those rows) or "sum".
    """

    def __init__(
        self,
        num_classes,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        ignore_index=None,
        label_smoothing=0.0,
        class_weight=None,
        z_loss=0.0,
        softcap=None,
        reduction="sum_over_batch_size",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _require_tensorflow_backend()
        if reduction not in _LINEAR_REDUCTIONS:
            raise ValueError(f"reduction must be one of {_LINEAR_REDUCTIONS}; got {reduction!r}")
        self.num_classes = int(num_classes)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.class_weight = None if class_weight is None else [float(w) for w in np.asarray(class_weight)]
        self.z_loss = float(z_loss)
        self.softcap = None if softcap is None else float(softcap)
        self.reduction = reduction

    def build(self, input_shape):
        hidden_shape = input_shape[0]
        features = hidden_shape[-1]
        if features is None:
            raise ValueError(f"the last dimension of the hidden input must be known; got shape {hidden_shape}")
        self.kernel = self.add_weight(
            name="kernel", shape=(features, self.num_classes), initializer=self.kernel_initializer
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.num_classes,), initializer=self.bias_initializer)
            if self.use_bias
            else None
        )

    def call(self, inputs, training=None):
        hidden, labels = inputs
        hidden = tf.convert_to_tensor(hidden)
        labels = tf.cast(labels, tf.int64)
        if len(labels.shape) == len(hidden.shape) and labels.shape[-1] == 1:
            labels = tf.squeeze(labels, axis=-1)  # Keras' sparse labels often come as (N, 1)
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), hidden.dtype)
        bias = None if self.bias is None else tf.cast(tf.convert_to_tensor(self.bias), hidden.dtype)
        options = dict(
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            class_weight=None if self.class_weight is None else np.asarray(self.class_weight),
            z_loss=self.z_loss,
            softcap=self.softcap,
            reduction=self.reduction,
        )
        loss = _fused_linear_loss(
            hidden,
            kernel,
            bias,
            labels,
            options,
            want_grads=training is not False,
            want_head_grads=self.trainable,
        )
        self.add_loss(loss)
        return loss

    def compute_output_shape(self, input_shape):
        return ()

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            class_weight=self.class_weight,
            z_loss=self.z_loss,
            softcap=self.softcap,
            reduction=self.reduction,
        )
        return config
