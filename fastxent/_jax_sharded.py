"""fastxent.jax on sharded logits: one device's part of the loss, with collectives over mesh axes.

A device holds a block of the logits: some rows (row sharding) and, when the class axis is
sharded, one class range of them. ``block_loss`` computes what the unsharded call computes,
from the block and O(N) collectives, never moving logits:

1. the range's statistics (``fastxent._range`` through the CPU kernels of ``fastxent.cpu.partial``),
   per row: max, sum of exps relative to it, the target's value, the smoothing sum relative to
   the max, the target's class weight (a host call over the block);
2. ``pmax`` of the row maxima and ``psum`` of the rescaled sums over the class axes (4 numbers
   per row, in float32; float64 for float64 logits): every device now holds the statistics of
   its rows over the whole vocabulary;
3. the reduction's denominator: a ``psum`` of one scalar over the row axes;
4. the per-row losses from the merged statistics (a host call on O(N) numbers, the same on every
   device of a class range group) and the gradient of the block (a host call writing it);
5. the reduction of the per-row losses: one scalar ``psum`` over the row axes.

It serves two callers: ``sparse_cross_entropy(..., axis_name=...)`` inside ``shard_map`` (class
axes given by the user, rows left to the user), and the SPMD partitioning rule of the fused call
under ``jit`` (``partitioned``, with ``jax.experimental.custom_partitioning``), where the input
shardings name both.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fastxent import _checks as checks
from fastxent import _range
from fastxent._jax_tangent import common_varying, mark_varying
from fastxent._options import KernelOptions
from fastxent._xla_ffi import register_host_target
from fastxent.cpu import partial
from fastxent.cpu.xent import part_bounds_for, use_split_rows

__all__ = [
    "block_loss",
    "label_error",
    "merge_errors",
    "partitioned",
    "partitioned_linear",
    "raise_together",
    "vocabulary_parallel",
]

# Rows of the statistics exchanged per row (the host call of step 1 returns them stacked).
_MAX, _SUM, _TARGET, _SMOOTH, _TARGET_WEIGHT = range(5)
_NUM_STATS = 5


def _comm_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ----------------------------------------------------------------------------------------
# Host side: NumPy over one device's block
# ----------------------------------------------------------------------------------------


def _global_labels(labels: np.ndarray, ignore_index: Optional[int], num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """int64 labels with ignored rows IGNORED, and where labels are outside [0, C) (also IGNORED
    here: the call raises once every device has passed its collectives, see ``host_check``)."""
    flat = labels.reshape(-1)
    ignored = np.zeros(flat.shape, bool) if ignore_index is None else flat == ignore_index
    bad = ~ignored & ((flat < 0) | (flat >= num_classes))
    return np.where(ignored | bad, _range.IGNORED, flat).astype(np.int64), bad


_NO_ERROR = np.iinfo(np.int32).max


def host_check(static: dict, num_classes: int, loss, error):
    """The loss, or the error every device raises together: ``error`` holds the first bad
    label's flattened position (``_NO_ERROR`` if none) and its value, merged over the mesh."""
    if int(error[0]) != _NO_ERROR:
        raise ValueError(checks.bad_label_message((int(error[0]),), int(error[1]), num_classes, static["ignore_index"]))
    return np.asarray(loss)


def _bounds(rows: np.ndarray) -> Optional[np.ndarray]:
    num_rows, width = rows.shape
    return part_bounds_for(num_rows, width) if num_rows and use_split_rows(num_rows, width) else None


def _options(static: dict, class_weight, num_classes: int, total: float = 0.0, scale: float = 1.0) -> KernelOptions:
    return KernelOptions(
        from_logits=True,
        label_smoothing=static["label_smoothing"],
        z_loss=static["z_loss"],
        softcap=static["softcap"],
        class_weight=None if class_weight is None else np.asarray(class_weight, np.float64),
        class_weight_total=total,
        num_classes=num_classes,
        grad_scale=scale,
    )


def host_stats(static: dict, num_classes: int, rows, labels, offsets, class_weight=None):
    """Step 1: the block's statistics, (5, n) in the communication dtype (module docstring), and
    int32 (2,): the flattened position of its first label outside [0, C) and the label."""
    rows = np.ascontiguousarray(rows)
    start, row_offset = int(offsets[0]), int(offsets[1])
    width = rows.shape[1]
    global_labels, bad = _global_labels(np.asarray(labels), static["ignore_index"], num_classes)
    local = _range.local_labels(global_labels, start, width)
    options = _options(static, class_weight, num_classes)
    stats = partial.range_stats(rows, local, options, _bounds(rows))
    out = np.zeros((_NUM_STATS, rows.shape[0]))
    out[_MAX], out[_SUM], out[_TARGET] = stats.row_max, stats.sum_exp, stats.target_value
    if static["label_smoothing"]:
        # sum_c w_c (v_c - max): terms of one sign, so the merge adds without cancelling.
        local_total = float(width if class_weight is None else np.sum(np.asarray(class_weight, np.float64)))
        with np.errstate(invalid="ignore"):
            shifted = stats.weighted_sum - local_total * stats.row_max
        out[_SMOOTH] = np.where(np.isfinite(stats.row_max), shifted, stats.weighted_sum)
    if class_weight is not None:
        owned = local >= 0
        out[_TARGET_WEIGHT][owned] = np.asarray(class_weight, np.float64)[local[owned]]
    error = np.array([_NO_ERROR, 0], np.int32)
    if bad.any():
        first = int(np.argmax(bad))
        value = int(np.asarray(labels).reshape(-1)[first])
        error[:] = row_offset + first, np.clip(value, -(2**31), 2**31 - 1)
    return out.astype(_comm_dtype(rows.dtype)), error


def _merged(static: dict, merged, row_max, weight_total: float):
    """The whole vocabulary's statistics (float64) from the exchanged numbers."""
    merged = np.asarray(merged, np.float64)
    row_max = np.asarray(row_max, np.float64)
    with np.errstate(invalid="ignore"):
        weighted = weight_total * row_max + merged[_SMOOTH] if static["label_smoothing"] else np.zeros_like(row_max)
    stats = _range.RowStats(
        row_max, merged[_SUM], merged[_TARGET], merged[_TARGET], weighted, np.full(row_max.shape, np.inf)
    )
    return stats


def host_rows(static: dict, num_classes: int, labels, merged, row_max, scalars, sample_weight=None, has_cw=False):
    """Step 4: the per-row losses (n,) in the communication dtype from merged statistics.

    ``scalars``: (class-weight total, denominator) as float64-convertible numbers.
    """
    total, denominator = float(scalars[0]), float(scalars[1])
    global_labels = _global_labels(np.asarray(labels), static["ignore_index"], num_classes)[0]
    stats = _merged(static, merged, row_max, total)
    target_weight = np.asarray(merged[_TARGET_WEIGHT], np.float64) if has_cw else np.ones(global_labels.shape)
    row_weight = np.ones(global_labels.shape) if sample_weight is None else np.asarray(sample_weight, np.float64)
    options = _options(static, None, num_classes, total, checks.grad_scale_for(denominator))
    coefs = _range.finish_rows(stats, global_labels, target_weight, row_weight.reshape(-1), options)
    return coefs, stats, global_labels, target_weight, options


def host_grad(
    static: dict, num_classes: int, rows, labels, offsets, merged, row_max, scalars, sample_weight, class_weight, out
):
    """Step 4: the block's gradient, written into ``out`` (n, w) from merged statistics."""
    rows = np.ascontiguousarray(rows)
    coefs, stats, global_labels, target_weight, options = host_rows(
        static, num_classes, labels, merged, row_max, scalars, sample_weight, class_weight is not None
    )
    options = _options(static, class_weight, num_classes, options.class_weight_total, options.grad_scale)
    local = _range.local_labels(global_labels, int(offsets[0]), rows.shape[1])
    return partial.range_grad(rows, local, stats, coefs, target_weight, options, part_bounds=_bounds(rows), out=out)


# ----------------------------------------------------------------------------------------
# The host calls as JAX operations (XLA FFI on the CPU, a host callback elsewhere)
# ----------------------------------------------------------------------------------------


def _target(kind: str, key, compute: Callable) -> str:
    digest = hashlib.sha256(repr((1, kind, key)).encode()).hexdigest()[:20]
    return register_host_target(f"fastxent_sharded_{kind}_{digest}", compute)


def _host_call(name: str, key, compute: Callable, host: Callable, shapes, arguments):
    """``host(*arrays) -> results`` as one operation: FFI on the CPU, pure_callback elsewhere."""
    arguments, varying = common_varying(list(arguments))

    def on_cpu(*args):
        results = jax.ffi.ffi_call(_target(name, key, compute), shapes, vmap_method="sequential")(*args)
        return mark_varying(results, varying)

    def elsewhere(*args):
        return mark_varying(jax.pure_callback(host, shapes, *args, vmap_method="sequential"), varying)

    return jax.lax.platform_dependent(*arguments, cpu=on_cpu, default=elsewhere)


def _key(static: dict) -> tuple:
    return tuple(sorted(static.items()))


def _stats_call(static, num_classes, rows, labels, offsets, class_weight):
    has_cw = class_weight is not None

    def host(rows, labels, offsets, *cw):
        return list(host_stats(static, num_classes, rows, labels, offsets, *cw))

    def compute(arguments, results):
        results[0][...], results[1][...] = host(*arguments)

    shapes = [
        jax.ShapeDtypeStruct((_NUM_STATS, rows.shape[0]), _comm_dtype(rows.dtype)),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    ]
    arguments = [rows, labels, offsets] + ([class_weight] if has_cw else [])
    key = (_key(static), num_classes, has_cw)
    return _host_call("stats", key, compute, host, shapes, arguments)


def raise_together(ignore_index: Optional[int], num_classes: int, array, error, after=()):
    """``array``, passed through a host call that raises the bad-label error ``error`` (see
    ``merge_errors``): operations that use the result run after it, so when every device raises
    there, none is left waiting in a later collective; ``after``: arrays (the results of earlier
    collectives) that the check waits for."""
    static = {"ignore_index": ignore_index}

    def host(array, error, *_):
        return [host_check(static, num_classes, array, error)]

    def compute(arguments, results):
        results[0][...] = host(*arguments)[0]

    shape = jax.ShapeDtypeStruct(array.shape, array.dtype)
    key = (ignore_index, num_classes, len(after))
    return _host_call("check", key, compute, host, [shape], [array, error, *after])[0]


def label_error(labels, ignore_index: Optional[int], num_classes: int, row_start):
    """int32 (2,): the flattened position (from ``row_start``) of the first label outside
    [0, C) that is not ignored (``_NO_ERROR`` if none), and that label."""
    flat = labels.reshape(-1)
    bad = (flat < 0) | (flat >= num_classes)
    if ignore_index is not None:
        bad &= flat != ignore_index
    index = jnp.argmax(bad)
    found = bad[index] if flat.size else jnp.bool_(False)
    position = jnp.where(found, row_start + index, _NO_ERROR).astype(jnp.int32)
    value = flat[index] if flat.size else jnp.zeros((), flat.dtype)
    value = jnp.clip(value, -(2**31), 2**31 - 1).astype(jnp.int32)
    return jnp.stack([position, value])


def merge_errors(error, axes: Tuple[str, ...]):
    """The first bad label over the devices of ``axes`` (two scalar collectives)."""
    if not axes:
        return error
    position = jax.lax.pmin(error[0], axes)
    value = jax.lax.pmax(jnp.where(error[0] == position, error[1], jnp.iinfo(jnp.int32).min), axes)
    return jnp.stack([position, value])


def _rows_call(static, num_classes, labels, merged, row_max, scalars, sample_weight, has_cw):
    has_sw = sample_weight is not None

    def host(labels, merged, row_max, scalars, *sw):
        coefs = host_rows(static, num_classes, labels, merged, row_max, scalars, *(sw or (None,)), has_cw)[0]
        return [coefs.loss.astype(merged.dtype)]

    def compute(arguments, results):
        results[0][...] = host(*arguments)[0]

    shape = jax.ShapeDtypeStruct((labels.shape[0],), merged.dtype)
    arguments = [labels, merged, row_max, scalars] + ([sample_weight] if has_sw else [])
    key = (_key(static), num_classes, has_sw, has_cw)
    return _host_call("rows", key, compute, host, [shape], arguments)[0]


def _grad_call(
    static, num_classes, rows, labels, offsets, merged, row_max, scalars, sample_weight, class_weight, after
):
    """The block's gradient; ``after`` (the checked loss) only orders it after the check."""
    has_sw, has_cw = sample_weight is not None, class_weight is not None

    def host(rows, labels, offsets, merged, row_max, scalars, after, *given, out=None):
        found = iter(given)
        sw = next(found) if has_sw else None
        cw = next(found) if has_cw else None
        return [host_grad(static, num_classes, rows, labels, offsets, merged, row_max, scalars, sw, cw, out)]

    def compute(arguments, results):
        host(*arguments, out=results[0])

    shape = jax.ShapeDtypeStruct(rows.shape, rows.dtype)
    arguments = [rows, labels, offsets, merged, row_max, scalars, after]
    arguments += ([sample_weight] if has_sw else []) + ([class_weight] if has_cw else [])
    key = (_key(static), num_classes, has_sw, has_cw)
    return _host_call("grad", key, compute, host, [shape], arguments)[0]


# ----------------------------------------------------------------------------------------
# One device's block, with collectives
# ----------------------------------------------------------------------------------------


def _psum(value, axes):
    return jax.lax.psum(value, axes) if axes else value


def _linear_index(axes: Tuple[str, ...]):
    """This device's index along the (major to minor) mesh axes that split one dimension."""
    index = jnp.int32(0)
    for name in axes:
        index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
    return index


def block_loss(
    static: dict,
    logits,
    labels,
    class_weight,
    sample_weight,
    *,
    class_axes: Tuple[str, ...],
    row_axes: Tuple[str, ...],
    want_grad: bool,
    error_axes: Tuple[str, ...] = (),
):
    """This device's part of the loss (and the gradient of its block), for use under shard_map.

    Args:
        static: the call's options (reduction, ignore_index, label_smoothing, z_loss, softcap).
        logits: (..., w) this device's block, the classes last: its rows, class range
            ``index * w`` to ``(index + 1) * w`` where ``index`` counts the devices along
            ``class_axes`` in mesh order.
        labels: the block's rows' global labels (logits' shape without the class axis).
        class_weight: None or this range's (w,) class weights.
        sample_weight: None or one weight per row (labels' shape).
        class_axes: mesh axes splitting the classes (the whole vocabulary is over them).
        row_axes: mesh axes splitting the rows that a reduction sums over.
        want_grad: also return the block's gradient.
        error_axes: further mesh axes whose devices raise together on a bad label.

    Returns:
        the loss ("none": per row, labels' shape; else the scalar over every row of
        ``row_axes``) in the communication dtype, and the gradient (logits' shape and dtype)
        when ``want_grad``.
    """
    lead_shape, width = labels.shape, logits.shape[-1]
    num_classes = width
    for name in class_axes:
        num_classes *= jax.lax.axis_size(name)
    num_classes = int(num_classes)
    rows = logits.reshape(-1, width)
    flat_labels = labels.reshape(-1)
    flat_weight = None if sample_weight is None else sample_weight.reshape(-1)
    num_rows = rows.shape[0]
    start = _linear_index(class_axes) * width
    # The flattened position of the first row, for error messages: along the row axes.
    row_start = _linear_index(row_axes) * num_rows
    offsets = jnp.stack([start, row_start]).astype(jnp.int32)

    # 1. the range's statistics
    stats, error = _stats_call(static, num_classes, rows, flat_labels, offsets, class_weight)
    local_max = stats[_MAX]
    # 2. merged over the classes: one MAX, one SUM of 4 numbers per row
    row_max = jax.lax.pmax(local_max, class_axes) if class_axes else local_max
    if class_axes:
        same = local_max == row_max  # -inf ranges keep their (zero) sum, never NaN
        factor = jnp.where(same, 1.0, jnp.exp(local_max - jnp.where(same, 0.0, row_max)))
        local_total = jnp.float32(width) if class_weight is None else jnp.sum(class_weight)
        shift = jnp.where(same, 0.0, local_total.astype(stats.dtype) * (local_max - row_max))
        parts = jnp.stack([stats[_SUM] * factor, stats[_TARGET], stats[_SMOOTH] + shift, stats[_TARGET_WEIGHT]])
        summed = jax.lax.psum(parts, class_axes)
        merged = jnp.stack([row_max, summed[0], summed[1], summed[2], summed[3]])
    else:
        merged = stats
    if class_weight is None:
        weight_total = jnp.asarray(num_classes, merged.dtype)
    else:
        weight_total = _psum(jnp.sum(class_weight.astype(merged.dtype)), class_axes)
    # 3. the reduction's denominator over every row
    reduction = static["reduction"]
    counted = jnp.ones(flat_labels.shape, bool)
    if static["ignore_index"] is not None:
        counted = flat_labels != static["ignore_index"]
    if reduction == "mean":
        weight = merged[_TARGET_WEIGHT] if class_weight is not None else jnp.ones_like(merged[_MAX])
        if flat_weight is not None:
            weight = weight * flat_weight.astype(weight.dtype)
        denominator = _psum(jnp.sum(jnp.where(counted, weight, 0.0)), row_axes)
    elif reduction == "sum_over_batch_size":
        denominator = _psum(jnp.sum(counted).astype(merged.dtype), row_axes)
    else:
        denominator = jnp.ones((), merged.dtype)
    scalars = jnp.stack([weight_total, denominator.astype(merged.dtype)])
    # 4. the per-row losses (identical on every device of a row block) and the block's gradient
    has_cw = class_weight is not None
    per_row = _rows_call(static, num_classes, flat_labels, merged, row_max, scalars, flat_weight, has_cw)
    # 5. the reduction
    if reduction == "none":
        loss = per_row.reshape(lead_shape)
    else:
        total = _psum(jnp.sum(per_row), row_axes)
        if reduction == "sum":
            loss = total
        else:
            loss = jnp.where(denominator == 0, 0.0, total / jnp.where(denominator == 0, 1.0, denominator))
    # 6. a bad label: every device raises in the same operation, after its last collective (a
    # device raising alone would leave the others waiting in a collective for ever).
    everyone = tuple(class_axes) + tuple(row_axes)
    everyone += tuple(a for a in error_axes if a not in everyone)
    loss = raise_together(static["ignore_index"], num_classes, loss, merge_errors(error, everyone))
    if not want_grad:
        return loss
    grad = _grad_call(
        static, num_classes, rows, flat_labels, offsets, merged, row_max, scalars, flat_weight, class_weight, loss
    )
    return loss, grad.reshape(logits.shape)


# ----------------------------------------------------------------------------------------
# The partitioning rule of the fused call under jit (XLA SPMD / Shardy)
# ----------------------------------------------------------------------------------------


def _spec_axes(entry) -> Tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _plan(mesh, logits_sharding, shape, class_axis: int):
    """(row spec entries per non-class dim, class axes) the partitioned call runs with: the
    logits' own sharding, less any dimension it does not split evenly."""
    spec = tuple(getattr(logits_sharding, "spec", P())) if isinstance(logits_sharding, NamedSharding) else ()
    spec = spec + (None,) * (len(shape) - len(spec))
    entries = []
    for dim, entry in enumerate(spec):
        axes = _spec_axes(entry)
        devices = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        entries.append(entry if axes and shape[dim] % devices == 0 else None)
    class_entry = entries[class_axis]
    row_entries = entries[:class_axis] + entries[class_axis + 1 :]
    return row_entries, _spec_axes(class_entry)


def partitioned(
    static: dict,
    class_axis: int,
    present: Tuple[bool, bool],
    want_grad: bool,
    local_call: Callable,
    ndim: int,
):
    """The fused call ``local_call(logits, labels, *weights)`` with an SPMD partitioning rule.

    Sharded over rows only with a per-row result, each device runs ``local_call`` on its rows
    (no collective). Otherwise each device runs ``block_loss`` on its block: with the classes
    split, O(N) collectives merge the statistics; reductions are scalar collectives. The
    gradient keeps the logits' sharding. On one device the call is ``local_call`` itself.
    """
    per_row = static["reduction"] == "none"
    letters = [f"r{d}" for d in range(ndim - 1)]
    logits_dims = letters[:class_axis] + ["c"] + letters[class_axis:]
    rows = " ".join(letters)
    operands = [" ".join(logits_dims), rows] + (["c"] if present[0] else []) + ([rows] if present[1] else [])
    results = [rows if per_row else ""] + ([" ".join(logits_dims)] if want_grad else [])
    rule = ", ".join(operands) + " -> " + ", ".join(results)

    @custom_partitioning
    def call(logits, labels, *weights):
        return local_call(logits, labels, *weights)

    def shardings(mesh, arg_shapes):
        row_entries, class_axes = _plan(mesh, arg_shapes[0].sharding, arg_shapes[0].shape, class_axis)
        class_entry = (class_axes if len(class_axes) > 1 else class_axes[0]) if class_axes else None
        logits_spec = P(*row_entries[:class_axis], class_entry, *row_entries[class_axis:])
        label_spec = P(*row_entries)
        args = [NamedSharding(mesh, logits_spec), NamedSharding(mesh, label_spec)]
        if present[0]:
            args.append(NamedSharding(mesh, P(class_entry)))
        if present[1]:
            args.append(NamedSharding(mesh, label_spec))
        loss = NamedSharding(mesh, label_spec if per_row else P())
        outs = (loss, NamedSharding(mesh, logits_spec)) if want_grad else loss
        row_axes = tuple(a for entry in row_entries for a in _spec_axes(entry))
        return args, outs, row_axes, class_axes

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    def partition(mesh, arg_shapes, result_shape):
        args, outs, row_axes, class_axes = shardings(mesh, arg_shapes)
        if not class_axes and (per_row or not row_axes):
            return mesh, local_call, outs, tuple(args)

        def lower(logits, labels, *weights):
            found = iter(weights)
            cw = next(found) if present[0] else None
            sw = next(found) if present[1] else None
            moved = jnp.moveaxis(logits, class_axis, -1)
            result = block_loss(
                static, moved, labels, cw, sw, class_axes=class_axes, row_axes=row_axes, want_grad=want_grad
            )
            if not want_grad:
                return result.astype(checks.loss_dtype(logits.dtype))
            loss, grad = result
            return loss.astype(checks.loss_dtype(logits.dtype)), jnp.moveaxis(grad, -1, class_axis)

        return mesh, lower, outs, tuple(args)

    call.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        propagate_user_sharding=None,
        sharding_rule=rule,
    )
    return call


def partitioned_linear(
    static: dict, wants: Tuple[bool, bool, bool], present: Tuple[bool, bool, bool], ndim: int, local_for
):
    """The fused linear call ``local_for(None)(hidden, weight, labels, *optional)`` (returning the
    loss and the wanted gradients of hidden, weight, bias) with an SPMD partitioning rule.

    Hidden states sharded over rows (data parallel): each device runs the fused kernel on its
    rows (the reduction "sum" where the result is a mean), the loss and the mean's denominator
    are scalar all-reductions, the hidden-state gradient keeps the rows' sharding, and the weight
    and bias gradients are all-reduced over the rows' axes (the one large collective, as in the
    unfused program). A weight sharded over the vocabulary is gathered first: a device needs
    every class of its rows. ``present``: bias, class_weight, sample_weight given.
    """
    reduction = static["reduction"]
    ignore_index = static["ignore_index"]
    per_row = reduction == "none"
    rows = " ".join(f"r{d}" for d in range(ndim - 1))
    operands = [f"{rows} h", "v h", rows] + [dims for here, dims in zip(present, ("v", "v", rows), strict=True) if here]
    results = [rows if per_row else ""] + [
        dims for want, dims in zip(wants, (f"{rows} h", "v h", "v"), strict=True) if want
    ]
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    local = local_for(None)

    @custom_partitioning
    def call(hidden, weight, labels, *optional):
        return local(hidden, weight, labels, *optional)

    def shardings(mesh, arg_shapes):
        hidden_sharding = arg_shapes[0].sharding
        entries, _ = _plan(mesh, hidden_sharding, arg_shapes[0].shape, ndim - 1)
        row_axes = tuple(a for entry in entries for a in _spec_axes(entry))
        _, vocab_axes = _plan(mesh, arg_shapes[1].sharding, arg_shapes[1].shape, 0)
        if set(vocab_axes) & set(row_axes):  # one mesh axis cannot split both: gather the head
            vocab_axes = ()
        vocab = (vocab_axes if len(vocab_axes) > 1 else vocab_axes[0]) if vocab_axes else None
        row_spec = P(*entries)
        named = functools.partial(NamedSharding, mesh)
        args = [named(P(*entries, None)), named(P(vocab, None)), named(row_spec)]
        args += [named(spec) for here, spec in zip(present, (P(vocab), P(vocab), row_spec), strict=True) if here]
        outs = [named(row_spec if per_row else P())]
        outs += [
            named(spec) for want, spec in zip(wants, (P(*entries, None), P(vocab, None), P(vocab)), strict=True) if want
        ]
        return tuple(args), outs, row_axes, vocab_axes

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[1]

    def partition(mesh, arg_shapes, result_shape):
        args, outs, row_axes, vocab_axes = shardings(mesh, arg_shapes)
        if vocab_axes:
            return mesh, vocabulary_parallel(static, wants, present, row_axes, vocab_axes), outs, args
        if not row_axes:
            return mesh, local, outs, args
        summed = local_for("sum" if reduction in ("mean", "sum_over_batch_size") else None)

        def lower(hidden, weight, labels, *optional):
            found = iter(optional)
            bias, class_weight, sample_weight = (next(found) if here else None for here in present)
            num_classes = weight.shape[0]
            flat = labels.reshape(-1)
            counted = jnp.ones(flat.shape, bool) if ignore_index is None else flat != ignore_index
            # 1. the reduction's denominator over every row, and the first bad label
            if reduction == "mean":
                weights = jnp.ones(flat.shape, jnp.float32)
                if class_weight is not None:
                    weights = class_weight.astype(jnp.float32)[jnp.clip(flat, 0, num_classes - 1)]
                if sample_weight is not None:
                    weights = weights * sample_weight.reshape(-1).astype(jnp.float32)
                denominator = jax.lax.psum(jnp.sum(jnp.where(counted, weights, 0.0)), row_axes)
            else:
                denominator = jax.lax.psum(jnp.sum(counted).astype(jnp.float32), row_axes)
            row_start = _linear_index(row_axes) * flat.shape[0]
            error = merge_errors(label_error(flat, ignore_index, num_classes, row_start), row_axes)
            # 2. every device raises together before the kernel, after the collectives above
            labels = raise_together(ignore_index, num_classes, labels, error, after=(denominator,))
            loss, *grads = summed(hidden, weight, labels, *optional)
            # 3. the reductions
            if reduction in ("mean", "sum_over_batch_size"):
                scale = jnp.where(denominator == 0, 0.0, 1.0 / jnp.where(denominator == 0, 1.0, denominator))
            else:
                scale = None
            if not per_row:
                loss = jax.lax.psum(loss, row_axes)
                loss = loss if scale is None else (loss * scale).astype(loss.dtype)
            found = iter(grads)
            out = [loss]
            for index, want in enumerate(wants):
                if not want:
                    continue
                grad = next(found)
                if index > 0:  # the weight and bias gradients: sums over every device's rows
                    grad = jax.lax.psum(grad, row_axes)
                out.append(grad if scale is None else (grad * scale).astype(grad.dtype))
            return out

        return mesh, lower, outs, args

    call.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return call


def vocabulary_parallel(
    static: dict, wants, present, row_axes: Tuple[str, ...], vocab_axes: Tuple[str, ...], error_axes=()
):
    """The fused linear call on one device's rows and vocabulary range (inside shard_map, or
    the partitioning rule's per-device program), ``(hidden, weight, labels, *optional) -> [loss,
    *wanted gradients]``: its block of logits by one GEMM, the loss by
    ``block_loss``, and the gradients from the block's gradient (not fused: the block of
    logits exists, as in the unfused program)."""

    def lower(hidden, weight, labels, *optional):
        found = iter(optional)
        bias, class_weight, sample_weight = (next(found) if here else None for here in present)
        logits = jnp.einsum("...h,vh->...v", hidden, weight)
        if bias is not None:
            logits = logits + bias
        result = block_loss(
            static,
            logits,
            labels,
            class_weight,
            sample_weight,
            class_axes=vocab_axes,
            row_axes=row_axes,
            want_grad=any(wants),
            error_axes=error_axes,
        )
        if not any(wants):
            return [result]
        loss, grad = result
        out = [loss]
        if wants[0]:  # every vocabulary range's share of the hidden states' gradient
            share = jnp.einsum("...v,vh->...h", grad, weight)
            out.append(jax.lax.psum(share, vocab_axes).astype(hidden.dtype))
        if wants[1]:  # this range's rows of the weight, summed over every device's rows
            rows = grad.reshape(-1, grad.shape[-1])
            mine = jnp.einsum("nv,nh->vh", rows, hidden.reshape(-1, hidden.shape[-1]))
            out.append(_psum(mine, row_axes).astype(weight.dtype))
        if wants[2]:
            out.append(_psum(grad.reshape(-1, grad.shape[-1]).sum(axis=0), row_axes).astype(bias.dtype))
        return out

    return lower
