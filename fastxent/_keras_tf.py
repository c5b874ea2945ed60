"""fastxent.keras on Keras' TensorFlow backend: the per-row losses and the fused linear loss.

``fastxent.keras`` calls these when ``keras.backend.backend()`` is "tensorflow". They reproduce
Keras' TensorFlow backend, quirks included:
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
dense target is 0 contributes 0 even where its logit is -inf (Keras: NaN).

The kernel runs as a host call (``tf.py_function`` in graphs) that XLA cannot compile:
``model.fit`` works with ``jit_compile=False`` (the default on CPU-only machines) and
``jit_compile=True`` raises a ``ValueError`` that says so.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import tensorflow as tf

from fastxent._linear_api import linear_cross_entropy_with_grad
from fastxent.tf import dense_per_row, host_call, sparse_per_row

__all__ = ["NAME", "categorical_crossentropy", "linear_loss", "sparse_categorical_crossentropy"]

NAME = "tensorflow"

# Ignored rows are handed to the kernel with this label: no real label can take it.
_IGNORED = np.iinfo(np.int64).min


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


@tf.autograph.experimental.do_not_convert
def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """``keras.losses.sparse_categorical_crossentropy`` on fastxent's fused kernel.

    Returns the per-row losses (``y_pred``'s shape without ``axis``), with a Keras mask of the
    rows that are not ``ignore_class``.
    """
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
    # Keras' own two checks and messages.
    if len(y_true.shape) != rank - 1:
        raise ValueError(
            "Argument `output` must have rank (ndim) `target.ndim - 1`. "
            f"Received: target.shape={y_true.shape}, output.shape={y_pred.shape}"
        )
    if not y_true.shape.is_compatible_with(row_shape):
        raise ValueError(
            "Arguments `target` and `output` must have the same shape up until the last dimension: "
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


# ----------------------------------------------------------------------------------------
# The output layer with its loss: linear + cross-entropy, fused
# ----------------------------------------------------------------------------------------


@tf.autograph.experimental.do_not_convert
def linear_loss(hidden, kernel, bias, labels, options, *, want_grads, want_head_grads):
    """The reduced loss of ``hidden @ kernel + bias`` against ``labels`` (kernel (H, V), Dense's
    layout), differentiable in hidden, kernel and bias; computed by
    ``fastxent.linear_cross_entropy_with_grad`` without the logits.

    With ``want_grads`` the host call computes the loss and the gradients together and the
    backward scales them by the incoming scalar; otherwise the loss alone, and a backward (if
    one is asked for after all) computes the gradients then. ``want_head_grads`` False skips
    the kernel and bias gradients (a frozen layer: no weight-gradient GEMM).
    """
    labels = tf.cast(labels, tf.int64)
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
