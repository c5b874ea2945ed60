"""The public entry points: validate, normalise options, dispatch by array type.

NumPy arrays go to the Numba CPU backend (``fastxent.cpu``); CuPy arrays go to the CUDA backend
(``fastxent.gpu``). Kernels know nothing of option names or user errors: everything a user can
get wrong is caught here and reported with the offending value.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from typing import Any, Literal, Optional, Tuple

import numpy as np

from fastxent._options import KernelOptions

Reduction = Literal["none", "sum", "mean", "sum_over_batch_size"]
REDUCTIONS = ("none", "sum", "mean", "sum_over_batch_size")

try:
    from ml_dtypes import bfloat16 as _BFLOAT16
except ImportError:  # pragma: no cover - ml_dtypes is a runtime dependency
    _BFLOAT16 = None

_FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64) + ((_BFLOAT16,) if _BFLOAT16 else ()))


class _Backend:
    """The array module and launcher for one kind of array."""

    def __init__(self, name: str, xp: Any, launcher: Any):
        self.name = name
        self.xp = xp
        self.launcher = launcher


def _is_cupy_array(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def _backend_for(logits: Any) -> _Backend:
    if _is_cupy_array(logits):
        from fastxent.gpu import load_backend

        xp, launcher = load_backend()
        return _Backend("gpu", xp, launcher)
    from fastxent.cpu import xent as cpu_xent

    return _Backend("cpu", np, cpu_xent)


def _as_logits(logits: Any, backend: _Backend):
    xp = backend.xp
    if backend.name == "cpu" and not isinstance(logits, np.ndarray):
        logits = np.asarray(logits)
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64; got dtype {logits.dtype}")
    if logits.ndim < 1:
        raise ValueError(f"logits must have at least one dimension (the classes); got shape {logits.shape}")
    return xp, logits


def _normalise_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for logits with {ndim} dimension(s)")
    return int(axis) % ndim


def _check_labels(labels: Any, xp: Any, lead_shape: Tuple[int, ...]):
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (class indices); got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits shape without the class "
            f"axis, {tuple(lead_shape)}"
        )
    return labels


def _check_options(from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap):
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")
    if not isinstance(from_logits, (bool, np.bool_)):
        raise TypeError(f"from_logits must be a bool; got {from_logits!r}")
    if ignore_index is not None and not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer or None; got {ignore_index!r}")
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if not isinstance(z_loss, numbers.Real) or not np.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0; got {z_loss!r}")
    if softcap is not None:
        if not isinstance(softcap, numbers.Real) or not np.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be a finite number > 0 or None; got {softcap!r}")
        if not from_logits:
            raise ValueError("softcap applies to logits; it cannot be combined with from_logits=False")


def _position(flat_index: int, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The index tuple of element ``flat_index`` of an array of ``shape``, as plain ints (NumPy 2
    would print np.int64(2) inside the tuple); () for a 0-d array."""
    return tuple(int(i) for i in np.unravel_index(flat_index, shape)) if shape else ()


def _find_bad_label(labels, valid, num_classes: int, xp: Any):
    """Position and value of the first label outside [0, C) that is not ignored, or None."""
    out_of_range = (labels < 0) | (labels >= num_classes)
    if valid is not None:
        out_of_range &= valid
    flat = out_of_range.reshape(-1)
    if not bool(flat.any()):
        return None
    first = int(xp.argmax(flat))
    return _position(first, tuple(labels.shape)), int(labels.reshape(-1)[first])


def _class_weights(class_weight, num_classes: int, xp: Any):
    """float64 (C,) weights on the logits' device, or None."""
    if class_weight is None:
        return None
    weights = xp.asarray(class_weight, dtype=xp.float64)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weight must have one entry per class, shape ({num_classes},); got {tuple(weights.shape)}"
        )
    return weights


def _to_host(values: dict, xp: Any) -> dict:
    """Python floats of a few device scalars, brought over in one transfer.

    On a GPU every read of a device value waits for the stream; packing the scalars the API
    needs (label check, class-weight sum, "mean" denominator, the softmax hint) into one array
    makes that a single synchronisation per call, the one the label check needs anyway.
    """
    if xp is np:  # host memory already: nothing to pack
        return {name: float(value) for name, value in values.items()}
    if not values:
        return {}
    names = list(values)
    packed = xp.stack([xp.asarray(values[name], dtype=xp.float64).reshape(()) for name in names])
    host = packed.get() if hasattr(packed, "get") else np.asarray(packed)
    return dict(zip(names, host.tolist(), strict=True))


def _row_weights(sample_weight, lead_shape: Tuple[int, ...], num_rows: int, xp: Any, rows_name: str):
    """float64 (N,) weight per row from ``sample_weight`` broadcast to the rows' shape (ones without)."""
    if sample_weight is None:
        return xp.ones(num_rows, dtype=xp.float64)
    sample = xp.asarray(sample_weight, dtype=xp.float64)
    try:
        return xp.ascontiguousarray(xp.broadcast_to(sample, lead_shape).reshape(-1))
    except ValueError:
        raise ValueError(
            f"sample_weight shape {tuple(sample.shape)} does not broadcast to {rows_name} {lead_shape}"
        ) from None


def _reject_negative_probabilities(row_min, lead_shape: Tuple[int, ...], xp: Any) -> None:
    """ValueError naming the first row with a negative value (``from_logits=False``)."""
    negative = row_min < 0
    if bool(negative.any()):
        row = int(xp.argmax(negative))
        position = _position(row, lead_shape)
        raise ValueError(
            f"from_logits=False expects probabilities, but row {position} "
            f"has a negative value ({float(row_min[row]):.6g}); the input looks like logits: "
            "pass from_logits=True"
        )


def _prepare(
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
):
    """Validate everything; return what a backend launcher needs and how to shape the result."""
    _check_options(from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap)
    backend = _backend_for(logits)
    xp, logits = _as_logits(logits, backend)
    axis = _normalise_axis(axis, logits.ndim)
    num_classes = int(logits.shape[axis])
    if num_classes == 0:
        raise ValueError(f"logits have no classes: shape {tuple(logits.shape)} is 0 along axis {axis}")
    lead_shape = tuple(logits.shape[:axis] + logits.shape[axis + 1 :])
    labels = _check_labels(labels, xp, lead_shape)

    flat = labels.reshape(-1)
    num_rows = flat.shape[0]
    out_of_range = (flat < 0) | (flat >= num_classes)
    flat_labels = flat.astype(xp.int64)
    if ignore_index is not None:
        ignored = flat == ignore_index
        out_of_range &= ~ignored
        flat_labels = xp.where(ignored, -1, flat_labels)
    weights = _class_weights(class_weight, num_classes, xp)
    row_weight = _row_weights(sample_weight, lead_shape, num_rows, xp, "the labels shape")
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
    device_scalars.update(_hint_scalars(logits, axis, from_logits, xp))
    host = _to_host(device_scalars, xp)

    if host.get("bad_labels"):
        first = int(host["first_bad"] if "first_bad" in host else np.argmax(out_of_range))
        position = _position(first, tuple(labels.shape))
        value = int(flat[first])
        hint = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
        raise ValueError(f"label {value} at position {position} is outside the valid range [0, {num_classes}){hint}")
    _warn_if_probabilities(host, logits.dtype, num_classes)
    weight_total = host["weight_total"] if weights is not None else float(num_classes)
    denominator = host.get("denominator", 1.0)
    # Nothing counted: the loss is 0.0 with a zero gradient (PyTorch returns NaN here).
    grad_scale = 0.0 if denominator == 0.0 else 1.0 / denominator

    options = KernelOptions(
        from_logits=bool(from_logits),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        class_weight=weights,
        class_weight_total=weight_total,
        num_classes=num_classes,
        grad_scale=grad_scale,
    )
    return backend, xp, logits, axis, lead_shape, flat_labels, row_weight, options, denominator


def _rows_view(logits, axis: int, xp: Any):
    """(N, C) C-contiguous rows of the logits: a view where possible, otherwise a copy."""
    moved = logits if axis == logits.ndim - 1 else xp.moveaxis(logits, axis, -1)
    return xp.ascontiguousarray(moved.reshape(-1, moved.shape[-1]))


def _float_eps(dtype) -> float:
    """Machine epsilon of a floating dtype, bfloat16 included."""
    if _BFLOAT16 is not None and dtype == _BFLOAT16:
        return 2.0**-7
    return float(np.finfo(dtype).eps)


# Values of the first row checked before the whole row (see _hint_scalars).
_HINT_PREFIX = 64


def _hint_scalars(logits, axis: int, from_logits: bool, xp: Any) -> dict:
    """Device scalars for the softmax hint (see ``_warn_if_probabilities``): whether the first
    row lies in [0, 1], and its sum. Empty when there is nothing to check.

    Looks at one row only, so the cost is C values, not N x C.
    """
    if not from_logits or logits.shape[axis] < 2 or logits.size == 0:
        return {}
    index = [0] * logits.ndim
    index[axis] = slice(None)
    first = logits[tuple(index)]
    if xp is np:
        # Real logits almost always leave [0, 1] within a few values: decide on a prefix first,
        # so the usual call does not convert a whole row of 128k classes (measured: ~100 us).
        prefix = first[:_HINT_PREFIX].astype(np.float64)
        if not bool(np.all((prefix >= 0) & (prefix <= 1))):
            return {}
    first = first.astype(xp.float64)
    return {"first_row_in_unit": xp.all((first >= 0) & (first <= 1)), "first_row_sum": first.sum()}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that points a warning raised by the caller at the first frame outside
    fastxent (the user's line, whichever entry point or adapter it came through)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def _warn_if_probabilities(host: dict, dtype, num_classes: int) -> None:
    """Keras-style hint when from_logits=True receives what looks like a softmax output:
    the first row is in [0, 1] and sums to 1 (``host``: ``_hint_scalars`` read back)."""
    if not host.get("first_row_in_unit"):
        return
    # A softmax rounded to the input's precision sums to 1 only within a few of its ulps
    # (bfloat16: 2**-8 already for five classes); float32 and wider keep the 1e-3 margin.
    tolerance = max(1e-3, 2.0 * _float_eps(dtype) * float(np.sqrt(num_classes)))
    if abs(host["first_row_sum"] - 1.0) < tolerance:
        warnings.warn(
            "logits look like probabilities (the first row is in [0, 1] and sums to 1); "
            "pass from_logits=False if they come out of a softmax",
            UserWarning,
            stacklevel=_stacklevel_outside_package(),
        )


def _reduce(per_row, reduction, denominator, lead_shape, loss_dtype, xp):
    if reduction == "none":
        return per_row.reshape(lead_shape).astype(loss_dtype)
    if denominator == 0.0:
        return xp.asarray(0.0, dtype=loss_dtype)
    return xp.asarray(per_row.sum() / denominator).astype(loss_dtype)


def _loss_dtype(logits_dtype):
    return np.float64 if logits_dtype == np.float64 else np.float32


def _check_out(out, logits, inplace: bool, xp: Any) -> None:
    """``out`` must be a writeable array like ``logits`` that does not overlap it."""
    if inplace:
        raise ValueError("pass either inplace=True (gradient over the logits) or out=, not both")
    if type(out) is not type(logits):
        raise TypeError(f"out must be a {type(logits).__name__} like the logits; got {type(out).__name__}")
    if tuple(out.shape) != tuple(logits.shape) or out.dtype != logits.dtype:
        raise ValueError(
            f"out must have the logits' shape {tuple(logits.shape)} and dtype {logits.dtype}; "
            f"got shape {tuple(out.shape)} and dtype {out.dtype}"
        )
    if not getattr(out.flags, "writeable", True):
        raise ValueError("out must be writeable")
    if xp.may_share_memory(out, logits):
        raise ValueError("out overlaps the logits; use inplace=True to write the gradient over them")


def _run(
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
    (backend, xp, logits, axis, lead_shape, flat_labels, row_weight, options, denominator) = _prepare(
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
    # CuPy arrays have no read-only flag (their flags lack "writeable"): always writeable.
    if inplace and not (isinstance(logits, xp.ndarray) and getattr(logits.flags, "writeable", True)):
        raise ValueError("inplace=True needs a writeable array of logits")
    rows = _rows_view(logits, axis, xp)
    out_rows = None
    if out is not None:
        _check_out(out, logits, inplace, xp)
        moved_out = xp.moveaxis(out, axis, -1)
        # The kernels write straight into ``out`` when its rows are contiguous; otherwise into a
        # new buffer that is copied into ``out`` below.
        if moved_out.flags.c_contiguous:
            out_rows = moved_out.reshape(rows.shape)
    # In place works directly on the caller's buffer when the rows are a view of it; otherwise
    # the gradient lands in the contiguous copy and is written back below.
    writes_through = (
        inplace and xp.shares_memory(rows, logits)
        if backend.name == "cpu"
        else (inplace and rows.data.ptr == logits.data.ptr and rows.flags.c_contiguous)
    )
    extra = {} if out_rows is None else {"grad_out": out_rows}
    per_row, grad_rows, row_min = backend.launcher.fused_xent(
        rows,
        flat_labels,
        row_weight,
        options,
        want_grad=want_grad,
        inplace=inplace,
        **extra,
    )
    if row_min is not None:
        _reject_negative_probabilities(row_min, lead_shape, xp)
    loss = _reduce(per_row, reduction, denominator, lead_shape, _loss_dtype(logits.dtype), xp)
    if not want_grad:
        return loss
    if inplace:
        if not (writes_through and grad_rows is rows):
            moved = xp.moveaxis(logits, axis, -1)
            moved[...] = grad_rows.reshape(moved.shape)
        return loss, logits
    grad = grad_rows.reshape(lead_shape + (grad_rows.shape[-1],))
    if axis != grad.ndim - 1:
        grad = xp.moveaxis(grad, -1, axis)
    if out is not None:
        if grad_rows is not out_rows:
            out[...] = grad
        return loss, out
    return loss, grad


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
    return _run(
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
    return _run(
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
