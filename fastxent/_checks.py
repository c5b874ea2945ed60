"""Shared checks of the entry points: option validation, array dispatch, host scalars, the
reductions, the loss dtype, the bad-label lookup and the in-place write-back.

The sparse (``_api``) and dense (``_dense_api``) entry points, ``fastxent.distributed`` and the
adapters all call these, so a user mistake gets the same message whichever door it came
through. Everything a user can get wrong raises ``ValueError``/``TypeError`` naming the
offending value; kernels never see an unchecked argument.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple

import numpy as np

Reduction = Literal["none", "sum", "mean", "sum_over_batch_size"]
REDUCTIONS = ("none", "sum", "mean", "sum_over_batch_size")

try:
    from ml_dtypes import bfloat16 as BFLOAT16
except ImportError:  # pragma: no cover - ml_dtypes is a runtime dependency
    BFLOAT16 = None

FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64) + ((BFLOAT16,) if BFLOAT16 else ()))


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    return type(value) is float or isinstance(value, numbers.Real)  # the plain float first: cheaper


def _is_finite(value) -> bool:
    return math.isfinite(value) if type(value) is float else bool(np.isfinite(value))


def check_options(from_logits, reduction, label_smoothing, *, ignore_index=None, z_loss=0.0, softcap=None) -> None:
    """The core options (the sparse-only ones default to "not given", as dense targets take them)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}")
    if not isinstance(from_logits, (bool, np.bool_)):
        raise TypeError(f"from_logits must be a bool; got {from_logits!r}")
    if ignore_index is not None and not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer or None; got {ignore_index!r}")
    if not _is_real(label_smoothing) or not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
    if not _is_real(z_loss) or not _is_finite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0; got {z_loss!r}")
    if softcap is not None:
        if not _is_real(softcap) or not _is_finite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be a finite number > 0 or None; got {softcap!r}")
        if not from_logits:
            raise ValueError("softcap applies to logits; it cannot be combined with from_logits=False")


# ----------------------------------------------------------------------------------------
# Arrays: which backend, which logits, which axis
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """The array module and launcher module for one kind of array (``name``: "cpu" or "gpu")."""

    name: str
    xp: Any
    launcher: Any


def is_cupy_array(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


def device_scope(array: Any):
    """A context in which the array's device is current: CuPy launches, limits and temporaries
    go to the device current at the time, which need not be the array's. No-op for the rest."""
    if is_cupy_array(array):
        return array.device
    return contextlib.nullcontext()


_CPU_BACKEND: Optional[Backend] = None


def cpu_backend() -> Backend:
    """The CPU backend (its launchers imported on first use, then kept)."""
    global _CPU_BACKEND
    if _CPU_BACKEND is None:
        from fastxent.cpu import xent as cpu_xent

        _CPU_BACKEND = Backend("cpu", np, cpu_xent)
    return _CPU_BACKEND


def backend_for(logits: Any) -> Backend:
    """The GPU backend for CuPy arrays (ImportError with an install hint without CuPy), else the CPU's."""
    if type(logits) is not np.ndarray and is_cupy_array(logits):
        from fastxent.gpu import load_backend

        xp, launcher = load_backend()
        return Backend("gpu", xp, launcher)
    return cpu_backend()


def as_logits(logits: Any, backend: Backend):
    """(array module, logits as an array of a floating dtype with at least one dimension)."""
    xp = backend.xp
    if backend.name == "cpu" and not isinstance(logits, np.ndarray):
        logits = np.asarray(logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64; got dtype {logits.dtype}")
    if logits.ndim < 1:
        raise ValueError(f"logits must have at least one dimension (the classes); got shape {logits.shape}")
    return xp, logits


def normalise_axis(axis: int, ndim: int) -> int:
    if type(axis) is int and axis == -1 and ndim:  # the usual call, without the ABC check below
        return ndim - 1
    if not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis!r} is out of range for logits with {ndim} dimension(s)")
    return int(axis) % ndim


def check_num_classes(logits: Any, axis: int) -> int:
    num_classes = int(logits.shape[axis])
    if num_classes == 0:
        raise ValueError(f"logits have no classes: shape {tuple(logits.shape)} is 0 along axis {axis}")
    return num_classes


def lead_shape_of(shape: Tuple[int, ...], axis: int) -> Tuple[int, ...]:
    """The shape without the class axis (the labels' and the per-row loss's shape)."""
    return tuple(shape[:axis]) + tuple(shape[axis + 1 :])


def check_labels(labels: Any, xp: Any, lead_shape: Tuple[int, ...]):
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (class indices); got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits shape without the class "
            f"axis, {tuple(lead_shape)}"
        )
    return labels


def rows_view(array: Any, axis: int, xp: Any):
    """(N, C) C-contiguous rows of an array with its classes on ``axis``: a view where
    possible, otherwise a copy. Unambiguous for zero classes (no reshape(-1, ...))."""
    if array.ndim == 2 and axis == 1 and array.flags.c_contiguous:
        return array
    moved = array if axis == array.ndim - 1 else xp.moveaxis(array, axis, -1)
    num_rows = math.prod(moved.shape[:-1])
    return xp.ascontiguousarray(moved.reshape(num_rows, moved.shape[-1]))


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------


def class_weights(class_weight, num_classes: int, xp: Any, *, what: str = "have one entry per class"):
    """float64 (C,) weights on the logits' device, or None (``what``: the rule the error states)."""
    if class_weight is None:
        return None
    weights = xp.asarray(class_weight, dtype=xp.float64)
    if weights.shape != (num_classes,):
        raise ValueError(f"class_weight must {what}, shape ({num_classes},); got {tuple(weights.shape)}")
    return xp.ascontiguousarray(weights)


def row_weights(sample_weight, lead_shape: Tuple[int, ...], xp: Any = np, *, rows_name: str = "the labels shape"):
    """float64 (N,) weight per row from ``sample_weight`` broadcast to the rows' shape (ones without)."""
    if sample_weight is None:
        # empty + fill: half the time of ones for the few rows of a small call.
        ones = xp.empty(math.prod(lead_shape), dtype=xp.float64)
        ones.fill(1.0)
        return ones
    sample = xp.asarray(sample_weight, dtype=xp.float64)
    try:
        return xp.ascontiguousarray(xp.broadcast_to(sample, lead_shape).reshape(-1))
    except ValueError:
        raise ValueError(
            f"sample_weight shape {tuple(sample.shape)} does not broadcast to {rows_name} {lead_shape}"
        ) from None


# ----------------------------------------------------------------------------------------
# Host scalars: one device-to-host transfer per call
# ----------------------------------------------------------------------------------------


def to_host(values: dict, xp: Any) -> dict:
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


# ----------------------------------------------------------------------------------------
# Errors found in the data
# ----------------------------------------------------------------------------------------


def position(flat_index: int, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The index tuple of element ``flat_index`` of an array of ``shape``, as plain ints (NumPy 2
    would print np.int64(2) inside the tuple); () for a 0-d array."""
    return tuple(int(i) for i in np.unravel_index(flat_index, shape)) if shape else ()


def find_bad_label(labels, valid, num_classes: int, xp: Any):
    """(position, value) of the first label outside [0, C) that is not ignored, or None."""
    out_of_range = (labels < 0) | (labels >= num_classes)
    if valid is not None:
        out_of_range &= valid
    flat = out_of_range.reshape(-1)
    if not bool(flat.any()):
        return None
    first = int(xp.argmax(flat))
    return position(first, tuple(labels.shape)), int(labels.reshape(-1)[first])


def bad_label_message(where, value, num_classes: int, ignore_index: Optional[int], *, of: str = "") -> str:
    """The error for label ``value`` at position ``where`` (``of``: words after the range)."""
    hint = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
    return f"label {value} at position {where} is outside the valid range [0, {num_classes}){of}{hint}"


def reject_negative_probabilities(row_min, lead_shape: Tuple[int, ...], xp: Any = np, *, where: str = "") -> None:
    """ValueError naming the first row with a negative value (``from_logits=False``)."""
    negative = row_min < 0
    if bool(negative.any()):
        row = int(xp.argmax(negative))
        raise ValueError(
            f"from_logits=False expects probabilities, but row {position(row, lead_shape)} "
            f"has a negative value ({float(row_min[row]):.6g}){where}; the input looks like logits: "
            "pass from_logits=True"
        )


# ----------------------------------------------------------------------------------------
# The softmax hint (from_logits=True given probabilities)
# ----------------------------------------------------------------------------------------


def float_eps(dtype) -> float:
    """Machine epsilon of a floating dtype, bfloat16 included."""
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return 2.0**-7
    return float(np.finfo(dtype).eps)


# Values of the first row checked before the whole row (see hint_scalars).
HINT_PREFIX = 64


def hint_scalars(logits, axis: int, from_logits: bool, xp: Any) -> dict:
    """Device scalars for the softmax hint (see ``warn_if_probabilities``): whether the first
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
        prefix = first[:HINT_PREFIX].astype(np.float64)
        if not bool(np.all((prefix >= 0) & (prefix <= 1))):
            return {}
    first = first.astype(xp.float64)
    return {"first_row_in_unit": xp.all((first >= 0) & (first <= 1)), "first_row_sum": first.sum()}


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def stacklevel_outside_package() -> int:
    """The ``stacklevel`` that points a warning raised by the caller at the first frame outside
    fastxent (the user's line, whichever entry point or adapter it came through)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def warn_if_probabilities(host: dict, dtype, num_classes: int) -> None:
    """Keras-style hint when from_logits=True receives what looks like a softmax output:
    the first row is in [0, 1] and sums to 1 (``host``: ``hint_scalars`` read back)."""
    if not host.get("first_row_in_unit"):
        return
    # A softmax rounded to the input's precision sums to 1 only within a few of its ulps
    # (bfloat16: 2**-8 already for five classes); float32 and wider keep the 1e-3 margin.
    tolerance = max(1e-3, 2.0 * float_eps(dtype) * float(np.sqrt(num_classes)))
    if abs(host["first_row_sum"] - 1.0) < tolerance:
        warnings.warn(
            "logits look like probabilities (the first row is in [0, 1] and sums to 1); "
            "pass from_logits=False if they come out of a softmax",
            UserWarning,
            stacklevel=stacklevel_outside_package(),
        )


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


def loss_dtype(logits_dtype) -> type:
    """The loss's NumPy dtype for logits of ``logits_dtype``: float64 for float64, else float32
    (half precision included, as Keras returns it). Any dtype NumPy can compare with works."""
    return np.float64 if logits_dtype == np.float64 else np.float32


def grad_scale_for(denominator: float) -> float:
    """The reduction's factor on each row's gradient; a zero denominator (nothing counted) gives
    a zero gradient with the loss 0.0 (PyTorch returns NaN there)."""
    return 0.0 if denominator == 0.0 else 1.0 / denominator


def reduce_loss(per_row, reduction: str, denominator: float, lead_shape: Tuple[int, ...], dtype, xp: Any):
    """The reduction of float64 per-row losses, in the loss dtype (0-d unless "none")."""
    if reduction == "none":
        return per_row.reshape(lead_shape).astype(dtype)
    if denominator == 0.0:
        return xp.asarray(0.0, dtype=dtype)
    return xp.asarray(per_row.sum() / denominator, dtype=dtype)


def check_inplace(logits, xp: Any) -> None:
    # CuPy arrays have no read-only flag (their flags lack "writeable"): always writeable.
    if not (isinstance(logits, xp.ndarray) and getattr(logits.flags, "writeable", True)):
        raise ValueError("inplace=True needs a writeable array of logits")


def check_out(out, logits, inplace: bool, xp: Any) -> None:
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


def rows_alias(rows, array, xp: Any) -> bool:
    """Whether ``rows`` (from ``rows_view``) are ``array``'s own memory, in the same order."""
    if xp is np:
        return bool(np.shares_memory(rows, array))
    return rows.data.ptr == array.data.ptr and rows.flags.c_contiguous


def write_back(logits, rows, grad_rows, axis: int, xp: Any):
    """The in-place result: ``logits`` holding the gradient. A kernel that wrote over ``rows``
    where they are the logits' own memory left nothing to do; otherwise (the rows were a copy,
    or the gradient landed elsewhere) it is copied in along the class axis."""
    if not (grad_rows is rows and rows_alias(rows, logits, xp)):
        moved = xp.moveaxis(logits, axis, -1)
        moved[...] = grad_rows.reshape(moved.shape)
    return logits


def grad_like(grad_rows, lead_shape: Tuple[int, ...], axis: int, xp: Any):
    """(N, C) gradient rows in the logits' layout: the lead shape, the classes back on ``axis``."""
    grad = grad_rows.reshape(tuple(lead_shape) + (grad_rows.shape[-1],))
    return grad if axis == grad.ndim - 1 else xp.moveaxis(grad, -1, axis)
