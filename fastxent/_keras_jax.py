"""fastxent.keras on Keras' JAX backend: the per-row losses from logits and the fused linear loss.

``fastxent.keras`` calls these when ``keras.backend.backend()`` is "jax". Sparse labels go to
``fastxent.jax.sparse_cross_entropy`` (an XLA custom call on the CPU: it compiles under
``jax.jit``, so ``model.fit`` runs with ``jit_compile`` on or off), the linear layer to
``fastxent.jax.linear_cross_entropy``. Dense targets call the core's fused dense kernel through
``jax.pure_callback`` with a custom VJP (the gradient from the same call as the loss).

Keras' JAX backend is reproduced: labels are cast to int32 (truncated), a trailing label axis of
1 is squeezed, the labels must have the shape of ``y_pred`` without its last axis (Keras' JAX
check, whatever ``axis`` is), and the losses come back in ``y_pred``'s dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import fastxent.jax as fastxent_jax
from fastxent import _dense_api
from fastxent._checks import loss_dtype

__all__ = ["NAME", "SKIPPED_LABEL", "dense_logits_per_row", "labels_like_keras", "linear_loss", "sparse_logits_per_row"]

NAME = "jax"
# Keras' JAX backend skips no label value (one_hot of an out-of-range label is a zero row).
SKIPPED_LABEL = None


def labels_like_keras(y_true, y_pred, axis):
    """The int32 labels and the shape checks of Keras' JAX ``sparse_categorical_crossentropy``."""
    target = jnp.asarray(y_true).astype(jnp.int32)
    output = jnp.asarray(y_pred)
    if len(target.shape) == len(output.shape) and target.shape[-1] == 1:
        target = jnp.squeeze(target, axis=-1)
    if len(output.shape) < 1:
        raise ValueError(f"Argument `output` must be at least rank 1. Received: output.shape={output.shape}")
    if target.shape != output.shape[:-1]:
        raise ValueError(
            "Arguments `target` and `output` must have the same shape up until the last dimension: "
            f"target.shape={target.shape}, output.shape={output.shape}"
        )
    return target


def sparse_logits_per_row(logits, labels, class_axis, valid):
    """Per-row cross-entropy of ``logits`` (classes on ``class_axis``) in their dtype; rows where
    ``valid`` is False give 0 and no gradient."""
    return fastxent_jax.sparse_cross_entropy(logits, labels, axis=class_axis, where=valid)


def _dense_host(want_grad, class_axis, logits, targets):
    """The per-row losses (and the gradient of their sum) of the fused dense kernel."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    if want_grad:
        return _dense_api.categorical_cross_entropy_with_grad(logits, targets, reduction="none", axis=class_axis)
    return _dense_api.categorical_cross_entropy(logits, targets, reduction="none", axis=class_axis)


@functools.lru_cache(maxsize=None)
def _dense_fused(class_axis: int):
    """``loss(logits, targets)``: per-row dense cross-entropy with a custom VJP. Differentiated,
    the forward computes the loss and the logits' gradient in one host call and the backward
    scales it; the targets' gradient (-log_softmax) is computed only when they are differentiated."""

    def call(want_grad, logits, targets):
        rows = logits.shape[:class_axis] + logits.shape[class_axis + 1 :]
        loss = jax.ShapeDtypeStruct(rows, loss_dtype(logits.dtype))
        results = (loss, jax.ShapeDtypeStruct(logits.shape, logits.dtype)) if want_grad else loss
        host = functools.partial(_dense_host, want_grad, class_axis)
        return jax.pure_callback(host, results, logits, targets, vmap_method="sequential")

    @jax.custom_vjp
    def loss(logits, targets):
        return call(False, logits, targets)

    def forward(logits, targets):
        value, grad = call(True, logits.value, targets.value)
        return value, (grad, logits.value if targets.perturbed else None)

    def backward(residuals, cotangent):
        grad, logits = residuals
        scale = jnp.expand_dims(cotangent, class_axis)
        d_logits = grad * scale.astype(grad.dtype)
        if logits is None:
            return d_logits, None
        # Keras' own derivative in the targets: -log_softmax(logits), in the logits' dtype.
        return d_logits, -jax.nn.log_softmax(logits, axis=class_axis) * scale.astype(logits.dtype)

    loss.defvjp(forward, backward, symbolic_zeros=True)
    return loss


def dense_logits_per_row(logits, targets, class_axis):
    """Per-row ``-sum(targets * log_softmax(logits))`` in the logits' dtype."""
    logits = jnp.asarray(logits)
    return _dense_fused(class_axis)(logits, jnp.asarray(targets, logits.dtype)).astype(logits.dtype)


def linear_loss(hidden, kernel, bias, labels, options, *, want_grads, want_head_grads):
    """The reduced loss of ``hidden @ kernel + bias`` (kernel (H, V), Dense's layout) against
    ``labels``, by ``fastxent.jax.linear_cross_entropy``. JAX differentiates only what it is
    asked to (``want_grads`` needs no flag here); a frozen head is cut off from the gradient."""
    del want_grads
    if not want_head_grads:
        kernel = jax.lax.stop_gradient(kernel)
        bias = None if bias is None else jax.lax.stop_gradient(bias)
    labels = jnp.asarray(labels).astype(jnp.int32)
    # The linear API takes the (V, H) weight of nn.Linear: the kernel's transpose.
    return fastxent_jax.linear_cross_entropy(hidden, jnp.transpose(kernel), labels, bias=bias, **options)
