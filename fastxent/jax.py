"""JAX drop-in for ``optax.softmax_cross_entropy_with_integer_labels`` on fastxent's fused kernel.

``sparse_cross_entropy(logits, labels, axis=-1, where=None)`` returns what optax returns (per-row
losses in the logits' dtype); fastxent's options (reduction, ignore_index, label smoothing, class
and sample weights, z-loss, softcap) are keyword arguments on top. A ``jax.custom_jvp`` computes
the loss and its gradient in one fused call when differentiating (the loss alone otherwise):
the loss's tangent is the kept gradient contracted with the logits' tangent, which JAX
transposes for reverse mode (on the CPU into an in-place scaling of the kept gradient, skipped
when the cotangent is 1: ``reduction="mean"`` under ``jax.grad`` costs no pass after the kernel;
see ``fastxent._jax_tangent``). It works under ``jit``, ``grad``, ``jvp``, ``jacfwd``, ``jacrev``
and ``vmap`` (one kernel call per mapped element). Second derivatives, and derivatives with
respect to the class or sample weights, raise instead of returning a wrong number.

``linear_cross_entropy(hidden, weight, labels, *, bias=None, ...)`` is the fused linear layer
+ cross-entropy (``fastxent.linear_cross_entropy``) with a ``jax.custom_vjp``.

On the CPU the kernel runs as an XLA FFI custom call (``jax.ffi``): it reads XLA's own argument
buffers and writes the loss and the gradient into the buffers the call returns, without copies.
On other platforms a host callback (``jax.pure_callback``) copies the arrays to the host and
back. Requires the ``jax`` extra; import it explicitly: ``import fastxent.jax``.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from fastxent import _api, _linear_api
from fastxent._checks import REDUCTIONS, check_options, loss_dtype
from fastxent._jax_sharded import block_loss, partitioned, partitioned_linear, vocabulary_parallel
from fastxent._jax_stats import TokenStats, linear_token_stats, token_stats  # noqa: F401  (re-export)
from fastxent._jax_tangent import (
    batched_as,
    common_varying,
    contract,
    mark_varying,
    summed_to_type_of,
    traced_or_spread,
)
from fastxent._xla_ffi import register_host_target

__all__ = ["linear_cross_entropy", "sparse_cross_entropy"]


def _is_zero(tangent) -> bool:
    """A tangent JAX knows to be zero without computing it (an undifferentiated argument)."""
    return tangent is None or isinstance(tangent, SymbolicZero)


def _all_zero(tangents) -> bool:
    """Whether every tangent in a pytree is known to be zero."""
    leaves = jax.tree_util.tree_leaves(tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))
    return all(_is_zero(t) for t in leaves)


@functools.lru_cache(maxsize=None)
def _cpu_target(
    options: Tuple[Tuple[str, Any], ...], class_axis: int, want_grad: bool, present: Tuple[bool, bool]
) -> str:
    """The XLA CPU custom-call target computing the loss (and gradient) for one configuration.

    XLA hands it its own buffers: the kernel reads the logits where they are and writes the
    loss and the gradient into the buffers the call returns.
    """
    static = dict(options)

    def compute(arguments, results):
        logits, labels, *given = arguments
        for array in arguments:
            array.flags.writeable = False
        weights = iter(given)
        class_weight, sample_weight = (next(weights) if here else None for here in present)
        common = dict(class_weight=class_weight, sample_weight=sample_weight, axis=class_axis, **static)
        if want_grad:
            loss, _ = _api.sparse_cross_entropy_with_grad(logits, labels, out=results[1], **common)
        else:
            loss = _api.sparse_cross_entropy(logits, labels, **common)
        results[0][...] = loss

    return register_host_target(_target_name("sparse_xent", options, class_axis, want_grad, present), compute)


def _target_name(kind: str, *configuration) -> str:
    """The custom-call target's name for one configuration, the same in every process.

    A program exported with ``jax.export`` names the targets it calls: the name is a digest of
    everything the target's handler is built from, so that it means the same computation in the
    process that runs the program, or is not registered there (an error, not another loss).
    """
    digest = hashlib.sha256(repr((_TARGET_VERSION, configuration)).encode()).hexdigest()[:20]
    return f"fastxent_{kind}_{digest}"


# Changes whenever a handler reads its arguments or writes its results differently.
_TARGET_VERSION = 1


@functools.lru_cache(maxsize=None)
def _fused(options: Tuple[Tuple[str, Any], ...], class_axis: int, axis_names: Tuple[str, ...] = ()):
    """The custom-JVP loss for one set of static options (cached: one trace per configuration).

    ``axis_names``: the mesh axes (inside ``shard_map``) splitting the class axis, or ().
    """
    static = dict(options)
    per_row = static["reduction"] == "none"

    def host(want_grad, logits, labels, class_weight, sample_weight):
        run = _api.sparse_cross_entropy_with_grad if want_grad else _api.sparse_cross_entropy
        return run(
            np.asarray(logits),
            np.asarray(labels),
            class_weight=class_weight,
            sample_weight=sample_weight,
            axis=class_axis,
            **static,
        )

    def shapes(logits, labels, want_grad):
        loss_shape = labels.shape if per_row else ()
        loss = jax.ShapeDtypeStruct(loss_shape, loss_dtype(logits.dtype))
        return (loss, jax.ShapeDtypeStruct(logits.shape, logits.dtype)) if want_grad else loss

    def call(want_grad, logits, labels, weights):
        present = tuple(w is not None for w in weights)
        # Inside shard_map: arguments varying over the same mesh axes, and results that do too.
        arguments, varying = common_varying([logits, labels, *(w for w in weights if w is not None)])
        target = _cpu_target(options, class_axis, want_grad, present)

        # The shapes are those of the arguments given: a device's block when partitioned.
        def on_cpu(*arguments):
            result_shapes = shapes(arguments[0], arguments[1], want_grad)
            results = jax.ffi.ffi_call(target, result_shapes, vmap_method="sequential")(*arguments)
            return mark_varying(results, varying)

        def elsewhere(*arguments):
            # Accelerators: a host callback (the arrays are copied to the host and back).
            results = jax.pure_callback(
                functools.partial(host_call, want_grad, present),
                shapes(arguments[0], arguments[1], want_grad),
                *arguments,
                vmap_method="sequential",
            )
            return mark_varying(results, varying)

        def local_call(*arguments):
            return jax.lax.platform_dependent(*arguments, cpu=on_cpu, default=elsewhere)

        if axis_names:
            # Inside shard_map, this device's class range: O(N) collectives over the axes.
            result = block_loss(
                static,
                jnp.moveaxis(logits, class_axis, -1),
                labels,
                *weights,
                class_axes=axis_names,
                row_axes=(),
                want_grad=want_grad,
                # A bad label raises on every device the arguments vary over together.
                error_axes=varying,
            )
            return (result[0], jnp.moveaxis(result[1], -1, class_axis)) if want_grad else result
        if varying:
            # Inside shard_map: the arrays are this device's blocks already.
            return local_call(*arguments)
        if not any(traced_or_spread(a) for a in arguments):
            # Eager on one device: nothing to partition.
            return local_call(*arguments)
        # Under jit (or sharded arrays), XLA partitions the call by the rule of _jax_sharded.
        key = (want_grad, present, logits.ndim)
        if key not in spmd_calls:
            spmd = partitioned(static, class_axis, present, want_grad, local_call, logits.ndim)
            spmd_calls[key] = batched_as(spmd, local_call)
        return spmd_calls[key](*arguments)

    # One partitioned operation per argument layout: the same objects, so JAX's caches hit.
    spmd_calls = {}

    def host_call(want_grad, present, logits, labels, *given):
        weights = iter(given)
        class_weight, sample_weight = (next(weights) if here else None for here in present)
        return host(want_grad, logits, labels, class_weight, sample_weight)

    @jax.custom_jvp
    def loss_and_grad(logits, labels, weights):
        return call(True, logits, labels, weights)

    def second_order(primals, tangents):
        if _all_zero(tangents):
            value = loss_and_grad(*primals)
            return value, tuple(jnp.zeros_like(v) for v in value)
        raise NotImplementedError(
            "fastxent.jax.sparse_cross_entropy has no second derivatives (jax.hessian, a jvp of a "
            "grad); use optax.softmax_cross_entropy_with_integer_labels where they are needed"
        )

    loss_and_grad.defjvp(second_order, symbolic_zeros=True)

    @jax.custom_jvp
    def loss(logits, labels, weights):
        return call(False, logits, labels, weights)

    def loss_jvp(primals, tangents):
        logits, labels, weights = primals
        logits_tangent, _, weight_tangents = tangents
        if not _all_zero(weight_tangents):
            raise NotImplementedError(
                "fastxent.jax.sparse_cross_entropy is not differentiable with respect to class_weight "
                "or sample_weight; pass them through jax.lax.stop_gradient"
            )
        if _is_zero(logits_tangent):
            value = call(False, logits, labels, weights)
            return value, jnp.zeros_like(value)
        value, grad = loss_and_grad(logits, labels, weights)
        # The tangent is linear in the logits' tangent (the kept gradient contracted with it), so
        # reverse mode transposes it into grad * cotangent: one fused call serves both modes.
        if grad.dtype == value.dtype == logits_tangent.dtype:
            # The primitive's transpose scales the kept gradient in place (see _jax_tangent).
            summed = (class_axis % grad.ndim,) if per_row else tuple(range(grad.ndim))
            tangent = contract(grad, logits_tangent, summed)
        else:
            product = grad.astype(value.dtype) * logits_tangent.astype(value.dtype)
            tangent = product.sum(axis=class_axis) if per_row else product.sum()
        # Each device holds its class range's share of the tangent.
        return value, (jax.lax.psum(tangent, axis_names) if axis_names else tangent)

    loss.defjvp(loss_jvp, symbolic_zeros=True)
    return loss


def _flatten_class_axes(logits, where, axis):
    """optax's handling of a tuple of class axes: move them last and flatten them into one."""
    # The classes are flattened in the order the axes are given, not in ascending order.
    class_axes = tuple(operator.index(a) % logits.ndim for a in axis)
    if len(set(class_axes)) != len(class_axes):
        raise ValueError(f"axis {axis} names an axis twice")
    batch_axes = tuple(a for a in range(logits.ndim) if a not in class_axes)
    order = batch_axes + class_axes
    logits = logits.transpose(order).reshape(tuple(logits.shape[a] for a in batch_axes) + (-1,))
    if where is not None and where.ndim == len(order):
        where = where.transpose(order).reshape(logits.shape)
    return logits, where, len(batch_axes)


def _ignore_rows(labels, keep, ignore_index: Optional[int], num_classes: int):
    """Labels with the rows where ``keep`` is False ignored, and the ``ignore_index`` that says so.

    The marker of a left-out row must never be a class: ``ignore_index`` where the labels' dtype
    holds it, else the dtype's minimum (signed: negative) or maximum (unsigned: above every class
    when there are fewer classes than it; otherwise the labels widen to a signed type first). A
    kept row holding the marker itself is out of range: it becomes a neighbouring out-of-range
    value, so that the call still reports a bad label instead of ignoring the row.
    """
    info = jnp.iinfo(labels.dtype)
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        return jnp.where(keep, labels, jnp.asarray(ignore_index, labels.dtype)), ignore_index
    # No label equals an ignore_index the dtype cannot hold: the marker replaces it.
    if info.min == 0 and num_classes >= info.max:
        wider = {1: jnp.int16, 2: jnp.int32, 4: jnp.int64}.get(labels.dtype.itemsize)
        if wider is None or jnp.dtype(wider) != jax.dtypes.canonicalize_dtype(wider):
            raise ValueError(
                f"where= needs a label value that is no class, but {labels.dtype} labels with "
                f"{num_classes} classes leave none; pass labels of a wider type (enable jax_enable_x64 for int64)"
            )
        labels = labels.astype(wider)
        info = jnp.iinfo(labels.dtype)
    marker = int(info.min) if info.min < 0 else int(info.max)
    neighbour = marker + 1 if info.min < 0 else marker - 1
    marker_value = jnp.asarray(marker, labels.dtype)
    labels = jnp.where(labels == marker_value, jnp.asarray(neighbour, labels.dtype), labels)
    return jnp.where(keep, labels, marker_value), marker


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
    axis_name: Union[None, str, Tuple[str, ...]] = None,
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
        axis_name: inside ``jax.shard_map``, the mesh axis (or axes, major first) over which the
            class axis is split: ``logits`` is this device's slice of the classes (in mesh
            order), ``labels`` are global class indices, ``class_weight`` is this slice's weights,
            and the result is the loss over the whole vocabulary of this device's rows (a
            reduction covers them only, as optax's would). O(N) numbers are exchanged.

    Returns:
        The loss in the logits' dtype: the labels' shape for "none", a scalar otherwise.

    Under ``jax.jit`` with sharded inputs (``NamedSharding``), the call is partitioned: rows
    sharded, each device computes its rows; classes sharded, each device its class range, the
    row statistics merged by O(N) collectives. The gradient keeps the logits' sharding.
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
        labels, ignore_index = _ignore_rows(labels, where, ignore_index, logits.shape[class_axis])

    options = (
        ("reduction", reduction),
        ("ignore_index", ignore_index),
        ("label_smoothing", float(label_smoothing)),
        ("z_loss", float(z_loss)),
        ("softcap", None if softcap is None else float(softcap)),
    )
    weights = tuple(None if w is None else jnp.asarray(w) for w in (class_weight, sample_weight))
    axis_names = () if axis_name is None else ((axis_name,) if isinstance(axis_name, str) else tuple(axis_name))
    loss = _fused(options, class_axis, axis_names)(logits, labels, weights)
    return loss.astype(logits.dtype)


# ----------------------------------------------------------------------------------------
# Linear layer + cross-entropy
# ----------------------------------------------------------------------------------------


def _linear_host(static, wants, hidden, weight, labels, bias, class_weight, sample_weight):
    """The loss and the wanted gradients (a list: loss, then each wanted gradient in order)."""
    loss, *grads = _linear_api.linear_cross_entropy_with_grad(
        np.asarray(hidden),
        np.asarray(weight),
        np.asarray(labels),
        bias=None if bias is None else np.asarray(bias),
        class_weight=None if class_weight is None else np.asarray(class_weight),
        sample_weight=None if sample_weight is None else np.asarray(sample_weight),
        hidden_grad=wants[0],
        weight_grad=wants[1],
        bias_grad=wants[2],
        **static,
    )
    return [loss] + [g for g, want in zip(grads, wants, strict=True) if want]


@functools.lru_cache(maxsize=None)
def _linear_cpu_target(options: Tuple[Tuple[str, Any], ...], wants: Tuple[bool, ...], present: Tuple[bool, ...]) -> str:
    """The XLA CPU custom-call target of one configuration: reads XLA's argument buffers, writes
    the loss and the wanted gradients into the result buffers."""
    static = dict(options)

    def compute(arguments, results):
        for array in arguments:
            array.flags.writeable = False
        hidden, weight, labels, *given = arguments
        optional = iter(given)
        bias, class_weight, sample_weight = (next(optional) if here else None for here in present)
        outputs = _linear_host(static, wants, hidden, weight, labels, bias, class_weight, sample_weight)
        # The linear API allocates its gradients (float32 accumulators rounded once): one copy
        # each into XLA's buffers.
        for result, output in zip(results, outputs, strict=True):
            result[...] = output

    return register_host_target(_target_name("linear_xent", options, wants, present), compute)


def _linear_call(options, wants, hidden, weight, labels, bias, class_weight, sample_weight, axis_names=()):
    """The loss and the wanted gradients, computed by one host call (XLA FFI on the CPU);
    partitioned by XLA when the arrays are sharded (see _jax_sharded). ``axis_names``: inside
    shard_map, the mesh axes splitting the weight's vocabulary."""
    optional = (bias, class_weight, sample_weight)
    present = tuple(a is not None for a in optional)
    arguments = (hidden, weight, labels, *(a for a in optional if a is not None))
    if axis_names:
        varying = common_varying(list(arguments))[1]
        per_device = vocabulary_parallel(dict(options), wants, present, (), axis_names, error_axes=varying)
        return list(per_device(*arguments))
    local = functools.partial(_linear_local, options, wants, present)
    if not any(traced_or_spread(a) for a in arguments):
        return list(local(*arguments))
    return list(_linear_spmd(options, wants, present, hidden.ndim)(*arguments))


@functools.lru_cache(maxsize=None)
def _linear_spmd(options, wants, present, ndim: int):
    """The partitioned linear call of one configuration (cached: JAX's caches then hit)."""

    def local_for(reduction):
        """One device's call with another reduction (None: the configuration's own)."""
        changed = tuple((k, reduction if k == "reduction" and reduction else v) for k, v in options)
        return functools.partial(_linear_local, changed, wants, present)

    return batched_as(partitioned_linear(dict(options), wants, present, ndim, local_for), local_for(None))


def _linear_local(options, wants, present, hidden, weight, labels, *given):
    """One device's call: the loss and the wanted gradients of its arrays."""
    static = dict(options)
    loss_shape = labels.shape if static["reduction"] == "none" else ()
    shapes = [jax.ShapeDtypeStruct(loss_shape, loss_dtype(hidden.dtype))]
    found = iter(given)
    bias = next(found) if present[0] else None
    for want, array in zip(wants, (hidden, weight, bias), strict=True):
        if want:
            shapes.append(jax.ShapeDtypeStruct(array.shape, array.dtype))
    # Inside shard_map: arguments varying over the same mesh axes, and results that do too.
    arguments, varying = common_varying([hidden, weight, labels, *given])

    def on_cpu(*args):
        target = _linear_cpu_target(options, wants, present)
        return mark_varying(jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(*args), varying)

    def elsewhere(*args):
        # Accelerators: a host callback (the arrays are copied to the host and back).
        def host(hidden, weight, labels, *given):
            found = iter(given)
            bias, class_weight, sample_weight = (next(found) if here else None for here in present)
            return _linear_host(static, wants, hidden, weight, labels, bias, class_weight, sample_weight)

        return mark_varying(jax.pure_callback(host, shapes, *args, vmap_method="sequential"), varying)

    return jax.lax.platform_dependent(*arguments, cpu=on_cpu, default=elsewhere)


@functools.lru_cache(maxsize=None)
def _linear_fused(options: Tuple[Tuple[str, Any], ...], axis_names: Tuple[str, ...] = ()):
    """The custom-VJP loss for one set of static options (cached: one trace per configuration).

    "mean"/"sum": the forward computes the loss and the gradients of the perturbed arguments in
    one call, the backward scales them by the incoming scalar. "none": the incoming gradient is
    one factor per row, which cannot scale a kept weight gradient (a sum over rows): the forward
    computes the loss alone, the backward the gradients with the factors as row weights.
    """
    static = dict(options)
    per_row = static["reduction"] == "none"
    weighted = tuple(sorted({**static, "reduction": "sum"}.items()))
    nothing = (False, False, False)

    @jax.custom_vjp
    def loss(hidden, weight, bias, labels, class_weight, sample_weight):
        return _linear_call(options, nothing, hidden, weight, labels, bias, class_weight, sample_weight, axis_names)[0]

    def forward(hidden, weight, bias, labels, class_weight, sample_weight):
        for name, primal in (("class_weight", class_weight), ("sample_weight", sample_weight)):
            if primal is not None and primal.perturbed:
                raise NotImplementedError(
                    f"fastxent.jax.linear_cross_entropy is not differentiable with respect to {name}; "
                    "pass it through jax.lax.stop_gradient"
                )
        wants = (hidden.perturbed, weight.perturbed, bias is not None and bias.perturbed)
        values = tuple(
            None if p is None else p.value for p in (hidden, weight, bias, labels, class_weight, sample_weight)
        )
        x, w, b, y, cw, sw = values
        if per_row:
            (value,) = _linear_call(options, nothing, x, w, y, b, cw, sw, axis_names)
            return value, (wants, values, None)
        value, *grads = _linear_call(options, wants, x, w, y, b, cw, sw, axis_names)
        return value, (wants, values, grads)

    def backward(residuals, cotangent):
        wants, (x, w, b, y, cw, sw), grads = residuals
        if isinstance(cotangent, SymbolicZero):
            return None, None, None, None, None, None
        if per_row:
            row_weight = cotangent if sw is None else cotangent * sw
            _, *grads = _linear_call(weighted, wants, x, w, y, b, cw, row_weight, axis_names)
        else:
            grads = [(g.astype(cotangent.dtype) * cotangent).astype(g.dtype) for g in grads]
        found = iter(grads)
        grad_x, grad_w, grad_b = (next(found) if want else None for want in wants)
        # Inside shard_map: a gradient varying over axes its argument does not is summed over them.
        grad_x, grad_w, grad_b = (
            None if g is None else summed_to_type_of(g, p) for g, p in ((grad_x, x), (grad_w, w), (grad_b, b))
        )
        return grad_x, grad_w, grad_b, None, None, None

    loss.defvjp(forward, backward, symbolic_zeros=True)
    return loss


def linear_cross_entropy(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    axis_name: Union[None, str, Tuple[str, ...]] = None,
):
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` without materialising them.

    ``optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T + bias, labels)`` reduced
    as ``reduction`` says, computed by ``fastxent.linear_cross_entropy`` (blocks of logits, each
    consumed while cached). A ``jax.custom_vjp``: with "mean", "sum" and "sum_over_batch_size"
    the forward computes the loss and the gradients of the arguments being differentiated in one
    call (a weight under ``jax.lax.stop_gradient``, or not among the ``argnums``, costs no
    weight-gradient GEMM) and the backward scales them; with "none" the forward computes the
    loss and the backward the gradients, the incoming per-row gradient folded in as row
    weights. Works under ``jit``, ``grad``, ``vjp`` and ``vmap`` (one call per mapped element).
    Forward mode (``jvp``, ``jacfwd``) and second derivatives raise: JAX has no forward mode
    for a custom VJP.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64.
        weight: (V, H) of the hidden's dtype (``nn.Linear``'s layout; a Flax ``Dense`` kernel
            is its transpose).
        labels: integer class indices, the hidden's shape without H.
        bias: (V,) of the hidden's dtype, or None.
        reduction: "mean" (divided by the summed weights of the counted rows), "sum",
            "sum_over_batch_size" or "none", as in ``fastxent.sparse_cross_entropy``.
        ignore_index, label_smoothing, class_weight (V,), sample_weight (labels' shape), z_loss,
            softcap: as in ``fastxent.sparse_cross_entropy`` (the weights are not differentiable).
        axis_name: inside ``jax.shard_map``, the mesh axis (or axes, major first) over which the
            weight's vocabulary is split: ``weight``, ``bias`` and ``class_weight`` are this
            device's rows of the vocabulary, ``labels`` global class indices; the loss is over
            the whole vocabulary for this device's rows (the device's block of logits is
            computed by one GEMM, not in chunks).

    Returns:
        The loss in the hidden's dtype: a scalar, or the labels' shape for "none".
    """
    hidden, weight, labels = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")
    if not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(f"hidden must be floating point; got {hidden.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers (class indices); got {labels.dtype}")
    # Shapes are checked here, at trace time: a host call cannot report them under jit.
    if hidden.ndim < 1 or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1]; got weight {weight.shape}, hidden {hidden.shape}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must be hidden's shape without H, {hidden.shape[:-1]}")
    if weight.dtype != hidden.dtype or (bias is not None and jnp.asarray(bias).dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must have the same dtype")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},); got {bias.shape}")
    options = (
        ("ignore_index", ignore_index),
        ("label_smoothing", float(label_smoothing)),
        ("reduction", reduction),
        ("softcap", None if softcap is None else float(softcap)),
        ("z_loss", float(z_loss)),
    )
    # The options are checked now rather than inside the host call.
    check_options(True, reduction, label_smoothing, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
    class_weight = None if class_weight is None else jnp.asarray(class_weight)
    sample_weight = None if sample_weight is None else jnp.broadcast_to(jnp.asarray(sample_weight), labels.shape)
    axis_names = () if axis_name is None else ((axis_name,) if isinstance(axis_name, str) else tuple(axis_name))
    loss = _linear_fused(options, axis_names)(hidden, weight, bias, labels, class_weight, sample_weight)
    return loss.astype(hidden.dtype)
