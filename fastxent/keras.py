"""Keras 3 drop-in losses on fastxent's fused kernels, on each Keras backend.

``SparseCategoricalCrossentropy`` and ``CategoricalCrossentropy`` are Keras' own classes (same
constructor, config, reduction, ``sample_weight``, mask and dtype-policy handling: ``isinstance``
checks still pass) with the per-row loss computed by fastxent, its gradient from the same fused
call. The module-level ``sparse_categorical_crossentropy`` and ``categorical_crossentropy``
mirror ``keras.losses``' functions; ``get`` and ``register`` resolve their names.

``LinearCrossEntropy`` is an output layer (Dense's kernel and bias) that adds the fused linear +
cross-entropy loss (``fastxent.linear_cross_entropy``) without materialising the logits.

Every call dispatches on ``keras.backend.backend()``:

* "tensorflow": ``fastxent.tf`` (a host call: ``jit_compile=True`` raises, asking for False).
  Keras' TensorFlow quirks are reproduced (``fastxent._keras_tf``): a softmax output is read
  back as its logits, probabilities are clipped and then normalised by a softmax.
* "jax": ``fastxent.jax`` (an XLA custom call: ``jit_compile`` on or off).
* "torch": ``fastxent.torch`` (autograd functions; ``jit_compile=True`` runs ``torch.compile``).

Each backend gives its own Keras numbers. On JAX and PyTorch, Keras reads probabilities
(``from_logits=False``) as ``log(clip(p / sum(p), 1e-7, 1 - 1e-7))`` with no softmax: nothing
to fuse there, so the sparse loss reads only each row's sum and its label's entry (no N x C
temporaries) and the dense loss is Keras' own. Labels outside [0, C) raise fastxent's
``ValueError`` (PyTorch's label -100 is ignored, as Keras' PyTorch backend does).
Import this module explicitly: ``import fastxent.keras``.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

__all__ = [
    "CategoricalCrossentropy",
    "LinearCrossEntropy",
    "SparseCategoricalCrossentropy",
    "categorical_crossentropy",
    "get",
    "register",
    "sparse_categorical_crossentropy",
]


def _backend():
    """The module that computes fastxent.keras' losses on the running Keras backend."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from fastxent import _keras_tf as module
    elif name == "jax":
        from fastxent import _keras_jax as module
    elif name == "torch":
        from fastxent import _keras_torch as module
    else:
        raise NotImplementedError(
            f"fastxent.keras runs on Keras' tensorflow, jax and torch backends; this Keras uses {name!r}"
        )
    return module


def _check_axis(axis) -> None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}")


def _set_keras_mask(tensor, mask) -> None:
    """Attach a Keras mask (Keras' reduction reads it) to a tensor of any backend."""
    from keras.src.backend import set_keras_mask

    set_keras_mask(tensor, mask)


def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """``keras.losses.sparse_categorical_crossentropy`` on fastxent's fused kernel.

    Args:
        y_true: class indices (any numeric dtype, truncated to integers as Keras does), the
            shape of ``y_pred`` without ``axis`` (a trailing axis of 1 is squeezed).
        y_pred: logits (``from_logits=True``) or probabilities, float16/bfloat16/float32/float64.
        from_logits, ignore_class, axis: as Keras'.

    Returns:
        The per-row losses in ``y_pred``'s dtype (its shape without ``axis``), with a Keras mask
        of the rows that are not ``ignore_class``.
    """
    _check_axis(axis)
    backend = _backend()
    if backend.NAME == "tensorflow":
        return backend.sparse_categorical_crossentropy(y_true, y_pred, from_logits, ignore_class, axis)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[axis] == 1:
        y_true = ops.squeeze(y_true, axis=axis)
    # Keras compares the labels in their own (floating) dtype with the ignored class.
    valid = None if ignore_class is None else ops.not_equal(y_true, ops.cast(ignore_class, y_pred.dtype))
    labels = backend.labels_like_keras(y_true, y_pred, axis)
    class_axis = axis % len(y_pred.shape)
    if from_logits:
        losses = backend.sparse_logits_per_row(y_pred, labels, class_axis, valid)
    else:
        losses = _sparse_probabilities_per_row(y_pred, labels, class_axis, valid, backend.SKIPPED_LABEL)
    if valid is not None:
        losses = ops.where(valid, losses, ops.zeros_like(losses))
        # Keras' reduction reads this mask: "sum_over_batch_size" divides by the rows kept.
        _set_keras_mask(losses, valid)
    return losses


def _sparse_probabilities_per_row(probabilities, labels, class_axis, valid, skipped_label):
    """Keras' JAX and PyTorch sparse loss on probabilities, ``-log(clip(p_y / sum(p)))``: the
    same arithmetic on the one entry per row that Keras' one-hot (or ``nll_loss``) keeps.

    Rows that are not ``valid`` and rows labelled ``skipped_label`` (PyTorch's ``nll_loss``
    ignores -100) give 0 and no gradient.
    """
    kept = valid
    if skipped_label is not None:
        counted = ops.not_equal(labels, skipped_label)
        kept = counted if kept is None else ops.logical_and(kept, counted)
    if kept is not None:
        labels = ops.where(kept, labels, ops.zeros_like(labels))
    total = ops.sum(probabilities, axis=class_axis, keepdims=True)
    picked = ops.take_along_axis(probabilities, ops.expand_dims(labels, class_axis), axis=class_axis)
    epsilon = keras.config.epsilon()
    losses = ops.squeeze(-ops.log(ops.clip(picked / total, epsilon, 1.0 - epsilon)), axis=class_axis)
    if kept is not None:
        losses = ops.where(kept, losses, ops.zeros_like(losses))
    return losses


def categorical_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """``keras.losses.categorical_crossentropy`` on fastxent's fused kernel.

    Args:
        y_true: one-hot or probability rows, ``y_pred``'s shape.
        y_pred: logits (``from_logits=True``) or probabilities, float16/bfloat16/float32/float64.
        from_logits, label_smoothing, axis: as Keras' (smoothing uses the size of the last axis,
            as Keras does whatever ``axis`` is).

    Returns:
        The per-row losses in ``y_pred``'s dtype (its shape without ``axis``).
    """
    _check_axis(axis)
    backend = _backend()
    if backend.NAME == "tensorflow":
        return backend.categorical_crossentropy(y_true, y_pred, from_logits, label_smoothing, axis)
    if not from_logits:
        # Keras' JAX and PyTorch backends take no softmax of probabilities: nothing to fuse.
        return keras.losses.categorical_crossentropy(
            y_true, y_pred, from_logits=False, label_smoothing=label_smoothing, axis=axis
        )
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    if y_pred.shape[-1] == 1:
        warnings.warn(
            "In loss categorical_crossentropy, expected y_pred.shape to be (batch_size, num_classes) "
            f"with num_classes > 1. Received: y_pred.shape={y_pred.shape}. Consider using "
            "'binary_crossentropy' if you only have 2 classes.",
            SyntaxWarning,
            stacklevel=2,
        )
    if label_smoothing:
        # Keras' formula in Keras' dtype (the size of the last axis, whatever ``axis`` is).
        num_classes = ops.cast(ops.shape(y_true)[-1], y_pred.dtype)
        y_true = y_true * (1.0 - label_smoothing) + (label_smoothing / num_classes)
    if tuple(y_true.shape) != tuple(y_pred.shape):
        raise ValueError(
            "Arguments `target` and `output` must have the same shape. "
            f"Received: target.shape={y_true.shape}, output.shape={y_pred.shape}"
        )
    if len(y_true.shape) < 1:
        raise ValueError(
            "Arguments `target` and `output` must be at least rank 1. "
            f"Received: target.shape={y_true.shape}, output.shape={y_pred.shape}"
        )
    return backend.dense_logits_per_row(y_pred, y_true, axis % len(y_pred.shape))


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


@keras.saving.register_keras_serializable(package="fastxent")
class LinearCrossEntropy(keras.layers.Layer):
    """An output layer and its loss in one: ``Dense(num_classes)`` + sparse cross-entropy from
    logits, computed by fastxent without the (N, num_classes) logits.

    The layer owns the kernel ``(H, num_classes)`` and bias ``(num_classes,)`` exactly as
    ``keras.layers.Dense(num_classes)`` does (same names, shapes and initializers:
    ``set_weights``/``get_weights`` carry over both ways). Called as ``layer([hidden, labels])``
    with hidden ``(..., H)`` and integer labels ``(...)``, it returns the reduced scalar loss and
    adds it to the model with ``add_loss``, so a model whose output is this layer trains with
    ``model.compile(optimizer, loss=None)`` and ``model.fit([hidden, labels])``. Design choice:
    the loss, not the logits, is the layer's output (returning logits would materialise them);
    per-token losses are not offered, so the backward only scales the gradients the forward
    computed (one fused call per step).

    In training the forward computes the loss and the gradients of hidden, kernel and bias in
    one call (kernel and bias only when the layer is trainable: a frozen head costs no
    weight-gradient GEMM); in inference the loss alone. On every Keras backend: TensorFlow
    (``jit_compile=False``), JAX (``fastxent.jax.linear_cross_entropy``) and PyTorch
    (``fastxent.torch.linear_cross_entropy``).

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
        _backend()  # an unsupported backend fails here, not at the first call
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
        hidden = ops.convert_to_tensor(hidden)
        labels = ops.convert_to_tensor(labels)
        if len(labels.shape) == len(hidden.shape) and labels.shape[-1] == 1:
            labels = ops.squeeze(labels, axis=-1)  # Keras' sparse labels often come as (N, 1)
        kernel = ops.cast(self.kernel, hidden.dtype)
        bias = None if self.bias is None else ops.cast(self.bias, hidden.dtype)
        options = dict(
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            class_weight=None if self.class_weight is None else np.asarray(self.class_weight, np.float32),
            z_loss=self.z_loss,
            softcap=self.softcap,
            reduction=self.reduction,
        )
        loss = _backend().linear_loss(
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
