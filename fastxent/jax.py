"""JAX drop-in for ``optax.softmax_cross_entropy_with_integer_labels`` on fastxent's fused kernel.

``sparse_cross_entropy(logits, labels, axis=-1, where=None)`` returns what optax returns (per-row
losses in the logits' dtype); fastxent's options (reduction, ignore_index, label smoothing, class
and sample weights, z-loss, softcap) are keyword arguments on top. A ``jax.custom_vjp`` around a
host callback computes the loss and its gradient in one fused call when differentiating (the
loss alone otherwise); the backward pass only scales the kept gradient. It works under ``jit``,
``grad`` and ``vmap`` (one callback per mapped element); second derivatives are not provided.

The callback runs on the host: arrays on an accelerator are copied to it and back, and JAX copies
the callback's results into its own buffers. Requires the ``jax`` extra; import it explicitly:
``import fastxent.jax``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from fastxent import _api
from fastxent._api import REDUCTIONS

__all__ = ["sparse_cross_entropy"]


def _loss_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@functools.lru_cache(maxsize=None)
def _fused(options: Tuple[Tuple[str, Any], ...], class_axis: int):
    """The custom-VJP loss for one set of static options (cached: one trace per configuration)."""
    static = dict(options)

    def host(want_grad, logits, labels, class_weight, sample_weight):
        run = _api.sparse_cross_entropy_with_grad if want_grad else _api.sparse_cross_entropy
        return run(np.asarray(logits), np.asarray(labels), class_weight=class_weight,
                   sample_weight=sample_weight, axis=class_axis, **static)

    def shapes(logits, labels, want_grad):
        loss_shape = labels.shape if static["reduction"] == "none" else ()
        loss = jax.ShapeDtypeStruct(loss_shape, _loss_dtype(logits.dtype))
        return (loss, jax.ShapeDtypeStruct(logits.shape, logits.dtype)) if want_grad else loss

    @jax.custom_vjp
    def loss_only(logits, labels, weights):
        return jax.pure_callback(functools.partial(host, False), shapes(logits, labels, False),
                                 logits, labels, *weights, vmap_method="sequential")

    def forward(logits, labels, weights):
        loss, grad = jax.pure_callback(functools.partial(host, True), shapes(logits, labels, True),
                                       logits, labels, *weights, vmap_method="sequential")
        return loss, grad

    def backward(grad, upstream):
        if static["reduction"] == "none":
            upstream = jnp.expand_dims(upstream, class_axis)
        # Labels and weights are data: no cotangent for them.
        return grad * upstream.astype(grad.dtype), None, None

    loss_only.defvjp(forward, backward)
    return loss_only


def _flatten_class_axes(logits, where, axis):
    """optax's handling of a tuple of class axes: move them last and flatten them into one."""
    class_axes = tuple(sorted(a % logits.ndim for a in axis))
    batch_axes = tuple(a for a in range(logits.ndim) if a not in class_axes)
    order = batch_axes + class_axes
    logits = logits.transpose(order).reshape(tuple(logits.shape[a] for a in batch_axes) + (-1,))
    if where is not None and where.ndim == len(order):
        where = where.transpose(order).reshape(logits.shape)
    return logits, where, len(batch_axes)


def sparse_cross_entropy(
    logits: Any,
    labels: Any,
    axis: Union[int, Tuple[int, ...]] = -1,
    where: Any = None,
    *,
    reduction: str = "none",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
):
    """``optax.softmax_cross_entropy_with_integer_labels``, computed by fastxent's fused kernel.

    Args:
        logits: floating logits with the classes on ``axis``.
        labels: integer class indices, the logits' shape without ``axis``.
        axis: the class axis, or a tuple of axes whose flattened slice holds the classes (optax).
        where: optax's mask: the labels' shape (rows where it is False get loss 0 and gradient 0)
            or the logits' shape (classes where it is False are left out of the softmax; the
            label's own class must be kept, else the row's loss is +inf where optax keeps the
            label's logit).
        reduction: "none" (optax's per-row losses, the default), "sum", "mean" or
            "sum_over_batch_size", as in ``fastxent.sparse_cross_entropy``.
        ignore_index, label_smoothing, class_weight, sample_weight, z_loss, softcap: as in
            ``fastxent.sparse_cross_entropy``.

    Returns:
        The loss in the logits' dtype: the labels' shape for "none", a scalar otherwise.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point; got {logits.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers (class indices); got {labels.dtype}")
    if where is not None:
        where = jnp.asarray(where)
    if isinstance(axis, tuple):
        logits, where, class_axis = _flatten_class_axes(logits, where, axis)
    elif isinstance(axis, (int, np.integer)):
        class_axis = int(axis) % logits.ndim
    else:
        raise ValueError(f"axis must be an int or a tuple of ints; got {type(axis)}")

    if where is not None:
        if where.ndim == logits.ndim:
            # Classes left out of the softmax; a row with no class left has loss 0 (optax).
            logits = jnp.where(where, logits, -jnp.inf)
            where = jnp.any(where, axis=class_axis)
        # Rows left out become ignored rows.
        if ignore_index is None:
            ignore_index = int(jnp.iinfo(labels.dtype).min)
        labels = jnp.where(where, labels, jnp.asarray(ignore_index, labels.dtype))

    options = (("reduction", reduction), ("ignore_index", ignore_index),
               ("label_smoothing", float(label_smoothing)), ("z_loss", float(z_loss)),
               ("softcap", None if softcap is None else float(softcap)))
    weights = tuple(None if w is None else jnp.asarray(w) for w in (class_weight, sample_weight))
    loss = _fused(options, class_axis)(logits, labels, weights)
    return loss.astype(logits.dtype)

