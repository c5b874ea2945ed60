"""The public entry points: validate, normalise options, dispatch by array type.

NumPy arrays go to the Numba CPU backend (``fastxent.cpu``); CuPy arrays go to the CUDA backend
(``fastxent.gpu``). Kernels know nothing of option names or user errors: everything a user can
get wrong is caught here (with the shared checks of ``fastxent._checks``) and reported with the
offending value.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from fastxent import _checks as checks
from fastxent._checks import REDUCTIONS, Reduction
from fastxent._options import KernelOptions

__all__ = ["REDUCTIONS", "Reduction", "log_softmax_gather", "sparse_cross_entropy", "sparse_cross_entropy_with_grad"]


class Prepared(NamedTuple):
    """A validated call: what the backend launcher needs and how to shape the result (a
    NamedTuple: built on every call, it costs a quarter of a frozen dataclass)."""

    backend: checks.Backend
    logits: Any  # the caller's array
    axis: int  # the class axis, normalised
    lead_shape: Tuple[int, ...]  # the labels' shape
    labels: Any  # int64 (N,), -1 for ignored rows
    row_weight: Any  # float64 (N,) sample weights
    options: KernelOptions
    denominator: float  # the reduction's divisor (1.0 for "none" and "sum")

    @property
    def xp(self):
        return self.backend.xp


class Static(NamedTuple):
    """What a call's shapes, dtypes and options decide, checked: the same for every call with
    the same ones (see ``static_checks``)."""

    backend: checks.Backend
    axis: int  # the class axis, normalised
    num_classes: int
    lead_shape: Tuple[int, ...]  # the labels' shape
    hint_on_host: bool  # the CPU's label pass takes the softmax hint of the first row
    options: Optional[KernelOptions]  # when no label value can change them (no weights, nothing ignored)


# Static checks passed, by (shapes, dtypes, options); see ``static_key``.
_STATIC: dict = {}
_STATIC_LIMIT = 1024
# Option values of these exact types are immutable and compare equal only when they check the
# same way (the type is part of the key: True, 1 and 1.0 are equal but not interchangeable).
_PLAIN_TYPES = frozenset((bool, int, float, str, type(None)))


def static_key(logits, labels, from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, axis, weights):
    """The key under which a call's static checks are kept, or None for a call whose checks are
    not kept (arrays other than NumPy's, options of other types). ``weights``: whether class or
    sample weights are given (they are arrays: checked on every call, never kept)."""
    if type(logits) is not np.ndarray or type(labels) is not np.ndarray:
        return None
    values = (from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, axis)
    types = tuple(map(type, values))
    if not _PLAIN_TYPES.issuperset(types):
        return None
    return (logits.shape, logits.dtype, logits.flags.c_contiguous, labels.shape, labels.dtype, weights, values, types)


def static_checks(
    logits, labels, *, from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, axis, weights
) -> Tuple[Any, Any, Static]:
    """(logits, labels, Static): everything the arrays' shapes and dtypes and the options
    decide, checked. Raises for the first user error; a call that passed is kept under
    ``static_key``, so the next call with the same shapes, dtypes and options skips these checks
    (the labels' values are checked on every call, by ``prepare_targets``)."""
    key = static_key(
        logits, labels, from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, axis, weights
    )
    static = _STATIC.get(key) if key is not None else None
    if static is not None:
        return logits, labels, static
    checks.check_options(
        from_logits, reduction, label_smoothing, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap
    )
    backend = checks.backend_for(logits)
    xp, logits = checks.as_logits(logits, backend)
    axis = checks.normalise_axis(axis, logits.ndim)
    num_classes = checks.check_num_classes(logits, axis)
    lead_shape = checks.lead_shape_of(logits.shape, axis)
    labels = checks.check_labels(labels, xp, lead_shape)
    hint_on_host = bool(
        backend.name == "cpu"
        and from_logits
        and axis == logits.ndim - 1
        and logits.shape[axis] >= 2
        and logits.size
        and logits.flags.c_contiguous
    )
    options = None
    if not weights and ignore_index is None:
        # Every row is counted with weight 1 (or the call raises): the denominator is the row count.
        num_rows = math.prod(lead_shape)
        options = kernel_options(
            from_logits,
            label_smoothing,
            z_loss,
            softcap,
            None,
            num_classes,
            denominator_of(reduction, float(num_rows), float(num_rows)),
        )
    static = Static(backend, axis, num_classes, lead_shape, hint_on_host, options)
    if key is not None:
        if len(_STATIC) >= _STATIC_LIMIT:
            _STATIC.clear()
        _STATIC[key] = static
    return logits, labels, static


def kernel_options(from_logits, label_smoothing, z_loss, softcap, weights, num_classes: int, denominator: float):
    """The kernels' options of checked arguments (``weights``: float64 class weights or None)."""
    return KernelOptions(
        from_logits=bool(from_logits),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        class_weight=weights,
        class_weight_total=float(weights.sum()) if weights is not None else float(num_classes),
        num_classes=num_classes,
        grad_scale=checks.grad_scale_for(denominator),
    )


def denominator_of(reduction, weight_sum: float, counted: float) -> float:
    """The reduction's divisor: the counted rows' weights for "mean", their number for
    "sum_over_batch_size", 1 otherwise."""
    if reduction == "mean":
        return weight_sum
    if reduction == "sum_over_batch_size":
        return counted
    return 1.0


def prepare(
    logits,
    labels,
    *,
    from_logits,
    reduction,
    ignore_index,
    label_smoothing,
    class_weight,
    sample_weight,
    z_loss,
    softcap,
    axis,
) -> Prepared:
    """Validate everything, with one device-to-host transfer of the scalars the host needs."""
    logits, labels, static = static_checks(
        logits,
        labels,
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        axis=axis,
        weights=class_weight is not None or sample_weight is not None,
    )
    backend, axis, num_classes = static.backend, static.axis, static.num_classes
    xp = backend.xp
    hint_row = logits.reshape(-1)[:num_classes] if static.hint_on_host else None
    flat_labels, row_weight, options, denominator, host = prepare_targets(
        labels,
        num_classes,
        xp,
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        extra_scalars=None if hint_row is not None else checks.hint_scalars(logits, axis, from_logits, xp),
        hint_row=hint_row,
        static_options=static.options,
    )
    checks.warn_if_probabilities(host, logits.dtype, num_classes)
    return Prepared(backend, logits, axis, static.lead_shape, flat_labels, row_weight, options, denominator)


def prepare_targets(
    labels,
    num_classes: int,
    xp: Any,
    *,
    from_logits,
    reduction,
    ignore_index,
    label_smoothing,
    class_weight,
    sample_weight,
    z_loss,
    softcap,
    extra_scalars: Optional[dict] = None,
    hint_row: Any = None,
    static_options: Optional[KernelOptions] = None,
):
    """The labels' side of a validated call: flat int64 labels (-1 ignored), float64 row
    weights, the kernels' options and the reduction's denominator, with every scalar the host
    needs (``extra_scalars`` too) read back in one transfer.

    ``hint_row``: NumPy only, a row of logits whose softmax-hint scalars (see
    ``checks.hint_scalars``) the CPU's label pass adds to the host scalars.
    ``static_options``: the options, when no label value can change them (``static_checks``).

    ``labels`` are already checked for dtype and shape (``checks.check_labels``); a label
    outside [0, C) that is not ignored raises ``ValueError`` here. Returns
    (labels, row_weight, options, denominator, host scalars).
    """
    flat = labels.reshape(-1)
    num_rows = flat.shape[0]
    weights = checks.class_weights(class_weight, num_classes, xp)
    row_weight = checks.row_weights(sample_weight, tuple(labels.shape), xp)
    if xp is np:
        encoded = checks.cpu_backend().launcher.encode_labels(
            flat, num_classes, ignore_index, weights, row_weight, hint_row
        )
        if encoded is not None:
            return _host_targets(
                labels,
                flat,
                encoded,
                row_weight,
                weights,
                num_classes,
                from_logits=from_logits,
                reduction=reduction,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                softcap=softcap,
                host={**(extra_scalars or {}), **encoded[4]},
                static_options=static_options,
            )
    if hint_row is not None:
        extra_scalars = {**(extra_scalars or {}), **checks.hint_scalars(hint_row, 0, True, np)}
    out_of_range = (flat < 0) | (flat >= num_classes)
    flat_labels = flat.astype(xp.int64)
    if ignore_index is not None:
        ignored = flat == ignore_index
        out_of_range &= ~ignored
        flat_labels = xp.where(ignored, -1, flat_labels)
    counted = flat_labels >= 0

    # Every scalar the host needs, computed on the device and read back together.
    device_scalars = {}
    if num_rows:
        device_scalars["bad_labels"] = xp.any(out_of_range)
        if xp is not np:  # on the host the position is looked up only when there is one
            device_scalars["first_bad"] = xp.argmax(out_of_range)
    if weights is not None:
        device_scalars["weight_total"] = weights.sum()
    if reduction == "mean":
        if weights is None:
            target_weight = row_weight
        else:  # out-of-range labels are replaced so the gather stays in bounds until reported
            target_weight = row_weight * weights[xp.where(counted & ~out_of_range, flat_labels, 0)]
        device_scalars["denominator"] = xp.sum(xp.where(counted, target_weight, 0.0))
    elif reduction == "sum_over_batch_size":
        device_scalars["denominator"] = xp.count_nonzero(counted)
    device_scalars.update(extra_scalars or {})
    host = checks.to_host(device_scalars, xp)

    if host.get("bad_labels"):
        first = int(host["first_bad"] if "first_bad" in host else np.argmax(out_of_range))
        where = checks.position(first, tuple(labels.shape))
        raise ValueError(checks.bad_label_message(where, int(flat[first]), num_classes, ignore_index))
    denominator = host.get("denominator", 1.0)
    options = KernelOptions(
        from_logits=bool(from_logits),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        class_weight=weights,
        class_weight_total=host["weight_total"] if weights is not None else float(num_classes),
        num_classes=num_classes,
        grad_scale=checks.grad_scale_for(denominator),
    )
    return flat_labels, row_weight, options, denominator, host


def _host_targets(
    labels,
    flat,
    encoded,
    row_weight,
    weights,
    num_classes: int,
    *,
    from_logits,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    host: dict,
    static_options: Optional[KernelOptions],
):
    """``prepare_targets``'s result from the CPU's one-pass label check (``encoded``: its
    encoded labels, first bad position, counted rows and weighted count)."""
    flat_labels, first_bad, counted, weight_sum, _ = encoded
    if first_bad >= 0:
        where = checks.position(first_bad, tuple(labels.shape))
        raise ValueError(checks.bad_label_message(where, int(flat[first_bad]), num_classes, ignore_index))
    denominator = denominator_of(reduction, weight_sum, float(counted))
    if static_options is not None:
        assert static_options.grad_scale == checks.grad_scale_for(denominator), "static options out of date"
        return flat_labels, row_weight, static_options, denominator, host
    options = kernel_options(from_logits, label_smoothing, z_loss, softcap, weights, num_classes, denominator)
    return flat_labels, row_weight, options, denominator, host


def _run(logits, labels, **call):
    """``_run_on_device`` on the logits' device (every argument keyword-only, passed through)."""
    if type(logits) is np.ndarray:  # host memory: no device to make current
        return _run_on_device(logits, labels, **call)
    with checks.device_scope(logits):
        return _run_on_device(logits, labels, **call)


def _run_on_device(
    logits,
    labels,
    *,
    want_grad,
    inplace,
    from_logits,
    reduction,
    ignore_index,
    label_smoothing,
    class_weight,
    sample_weight,
    z_loss,
    softcap,
    axis,
    out=None,
):
    call = prepare(
        logits,
        labels,
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        axis=axis,
    )
    xp, logits, axis = call.xp, call.logits, call.axis
    if inplace:
        checks.check_inplace(logits, xp)
    rows = checks.rows_view(logits, axis, xp)
    out_rows = None
    if out is not None:
        checks.check_out(out, logits, inplace, xp)
        # np.moveaxis costs microseconds even when there is nothing to move (axis last).
        moved_out = out if axis == out.ndim - 1 else xp.moveaxis(out, axis, -1)
        # The kernels write straight into ``out`` when its rows are contiguous; otherwise into a
        # new buffer that is copied into ``out`` below.
        if moved_out.flags.c_contiguous:
            out_rows = moved_out.reshape(rows.shape)
    extra = {} if out_rows is None else {"grad_out": out_rows}
    per_row, grad_rows, row_min = call.backend.launcher.fused_xent(
        rows, call.labels, call.row_weight, call.options, want_grad=want_grad, inplace=inplace, **extra
    )
    if row_min is not None:
        checks.reject_negative_probabilities(row_min, call.lead_shape, xp)
    loss = checks.reduce_loss(
        per_row, reduction, call.denominator, call.lead_shape, checks.loss_dtype(logits.dtype), xp
    )
    if not want_grad:
        return loss
    if inplace:
        # In place works directly on the caller's buffer when the rows are a view of it;
        # otherwise the gradient landed in the contiguous copy and is written back.
        return loss, checks.write_back(logits, rows, grad_rows, axis, xp)
    if out is not None:
        if grad_rows is not out_rows:
            out[...] = checks.grad_like(grad_rows, call.lead_shape, axis, xp)
        return loss, out
    return loss, checks.grad_like(grad_rows, call.lead_shape, axis, xp)


def sparse_cross_entropy(
    logits: Any,
    labels: Any,
    *,
    from_logits: bool = True,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    axis: int = -1,
):
    """Sparse categorical cross-entropy in one fused sweep over the logits.

    Args:
        logits: float16/bfloat16/float32/float64 array, shape (..., C, ...) with the classes on
            ``axis``. NumPy arrays run on the CPU; CuPy arrays on the GPU.
        labels: integer array of class indices, the logits' shape without the class axis.
        from_logits: False when ``logits`` are probabilities (Keras semantics: clipped to
            [1e-7, 1 - 1e-7], rows renormalised). Negative values then raise ``ValueError``.
        reduction: "none" (per-row losses), "sum", "mean" (divided by the sum of the row weights,
            as PyTorch with ``weight``), or "sum_over_batch_size" (divided by the number of counted
            rows, Keras' default). When no row is counted, "mean" and "sum_over_batch_size" are 0.0.
        ignore_index: a label value whose rows get loss 0 and gradient 0 and are not counted.
        label_smoothing: epsilon in [0, 1); PyTorch's formula (with class weights too).
        class_weight: (C,) weight per class; a row's weight is class_weight[label] * sample_weight.
        sample_weight: weight per row, broadcastable to the labels' shape.
        z_loss: adds ``z_loss * logsumexp(x)**2`` to each row's loss.
        softcap: s in ``x <- s * tanh(x / s)``, applied to the logits first.
        axis: the class axis.

    Returns:
        The loss: float32 (float64 for float64 logits); 0-d for "sum"/"mean"/
        "sum_over_batch_size", the labels' shape for "none".
    """
    # Host arrays skip ``_run``'s device scope (and one more pass of these keywords).
    run = _run_on_device if type(logits) is np.ndarray else _run
    return run(
        logits,
        labels,
        want_grad=False,
        inplace=False,
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        axis=axis,
    )


def sparse_cross_entropy_with_grad(
    logits: Any,
    labels: Any,
    *,
    from_logits: bool = True,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    axis: int = -1,
    inplace: bool = False,
    out: Any = None,
):
    """Loss and its gradient d(loss)/d(logits), computed in the same fused call.

    Takes the arguments of ``sparse_cross_entropy`` plus ``inplace``. With reduction "none" the
    gradient is that of the sum of the per-row losses.

    Args:
        inplace: write the gradient over ``logits`` (which must be a writeable array) instead of
            allocating an N x C buffer; ``logits`` no longer holds the logits afterwards.
        out: a writeable array with the logits' shape and dtype (and type: NumPy or CuPy), not
            overlapping them, that receives the gradient. Reusing one across training steps
            saves allocating and page-faulting a fresh N x C array on every call.

    Returns:
        (loss, grad): the loss as ``sparse_cross_entropy`` returns it, and the gradient with the
        logits' shape and dtype (the ``logits`` array itself when ``inplace=True``, ``out`` when
        given).
    """
    # Host arrays skip ``_run``'s device scope (and one more pass of these keywords).
    run = _run_on_device if type(logits) is np.ndarray else _run
    return run(
        logits,
        labels,
        want_grad=True,
        inplace=bool(inplace),
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        axis=axis,
        out=out,
    )


def log_softmax_gather(logits: Any, labels: Any, *, axis: int = -1):
    """log p(label) = x_label - logsumexp(x) per row, labels-shaped (float32, float64 for float64)."""
    return -sparse_cross_entropy(logits, labels, reduction="none", axis=axis)
