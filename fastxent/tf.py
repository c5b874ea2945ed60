"""TensorFlow drop-in: ``sparse_softmax_cross_entropy_with_logits`` on fastxent's fused kernel.

The loss and its gradient come out of one fused call; without a tape, the loss alone. Second
derivatives are exact for logits (the softmax Hessian, recomputed in float32 or wider), as
TensorFlow's own op provides them.

In eager mode the kernel is called directly on the tensors' memory (``np.from_dlpack``, no copy
of the logits); under a tape the forward keeps the gradient and the backward scales it in place
by the incoming per-row gradient. Inside ``tf.function`` (and so in ``model.fit``) it runs
through ``tf.py_function``, which XLA cannot compile: use ``jit_compile=False`` there; the
forward computes the loss alone and the backward computes the gradient with the incoming
gradient folded in as row weights. Gradients go back to TensorFlow through DLPack without a copy,
in 64-byte aligned buffers (TensorFlow refuses others) drawn from a small pool
(``fastxent.host_buffers``) so that a training step does not page-fault a fresh N x C buffer.
GPU tensors go to fastxent's CuPy backend through DLPack.

Import this module explicitly: ``import fastxent.tf``. ``fastxent.keras`` builds on it. Its
functions are plain Python around TensorFlow ops (no tensor-dependent control flow), so
AutoGraph is told not to convert them.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from fastxent import _dense_api
from fastxent._api import sparse_cross_entropy, sparse_cross_entropy_with_grad
from fastxent._range import PROB_EPS, PROB_ONE_MINUS_EPS
from fastxent.cpu.rowscale import SCALABLE_DTYPES, scale_rows_
from fastxent.host_buffers import host_output_like

try:
    from tensorflow.python.eager import record as _record
except ImportError:  # pragma: no cover - a TensorFlow that moved it
    _record = None

__all__ = ["InvalidLabelError", "sparse_softmax_cross_entropy_with_logits"]

# TensorFlow accepts a buffer through DLPack only at this alignment (it aborts otherwise).
_TF_ALIGNMENT = 64


class InvalidLabelError(ValueError, tf.errors.InvalidArgumentError):
    """A label outside [0, C): fastxent's ``ValueError``, also TensorFlow's ``InvalidArgumentError``
    (what ``tf.nn.sparse_softmax_cross_entropy_with_logits`` raises on the CPU), so existing
    handlers keep working."""

    def __init__(self, message: str):
        tf.errors.InvalidArgumentError.__init__(self, None, None, message)

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------------------
# Exchange with the kernels
# ----------------------------------------------------------------------------------------


def _on_gpu(tensor) -> bool:
    return "GPU" in (tensor.device or "").upper()


def _cupy():
    """CuPy, through fastxent's GPU backend (which raises an install hint without it)."""
    from fastxent.gpu import load_backend

    return load_backend()[0]


def _bfloat16_numpy():
    from ml_dtypes import bfloat16

    return np.dtype(bfloat16)


def _to_array(tensor):
    """NumPy (CPU) or CuPy (GPU) array over an eager tensor's memory."""
    if _on_gpu(tensor):
        cupy = _cupy()
        if tensor.dtype == tf.bfloat16:
            raise TypeError(
                "bfloat16 GPU tensors cannot be handed to fastxent's GPU backend yet (CuPy has "
                "no bfloat16 dtype); use float16 or float32 logits"
            )
        # TensorFlow's stream is not exposed: finish its pending work before CuPy reads.
        cupy.cuda.runtime.deviceSynchronize()
        return cupy.from_dlpack(tf.experimental.dlpack.to_dlpack(tensor))
    if tensor.dtype == tf.bfloat16:
        # NumPy has no bfloat16 in DLPack: share the bits as int16, view them as ml_dtypes' bfloat16.
        return np.from_dlpack(tf.bitcast(tensor, tf.int16)).view(_bfloat16_numpy())
    return np.from_dlpack(tensor)


def _to_tensor(array, dtype: tf.DType):
    """A tensor holding ``array``: shared where TensorFlow allows it, otherwise one copy."""
    if not isinstance(array, np.ndarray):  # CuPy
        _cupy().cuda.runtime.deviceSynchronize()
        tensor = tf.experimental.dlpack.from_dlpack(array.toDlpack())
        return tf.cast(tensor, dtype) if tensor.dtype != dtype else tensor
    if array.dtype == _bfloat16_numpy():
        return tf.bitcast(_to_tensor(array.view(np.int16), tf.int16), tf.bfloat16)
    if array.ndim and array.flags.c_contiguous and array.ctypes.data % _TF_ALIGNMENT == 0:
        tensor = tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    else:
        tensor = tf.convert_to_tensor(array)
    return tf.cast(tensor, dtype) if tensor.dtype != dtype else tensor


def host_call(compute: Callable, inputs: Sequence, out_dtypes: Sequence[tf.DType], out_shapes: Sequence):
    """Run ``compute(*arrays) -> arrays`` on the tensors' memory; through ``tf.py_function`` in graphs."""

    def run(*tensors):
        results = compute(*[_to_array(tensor) for tensor in tensors])
        return [_to_tensor(result, dtype) for result, dtype in zip(results, out_dtypes, strict=True)]

    if tf.executing_eagerly():
        return run(*inputs)
    if _in_xla_context():
        raise ValueError(
            "fastxent runs its kernel as a host call, which XLA cannot compile: use jit_compile=False "
            "(model.compile(..., jit_compile=False) or tf.function(..., jit_compile=False))"
        )
    outputs = tf.py_function(run, list(inputs), Tout=list(out_dtypes))
    for output, shape in zip(outputs, out_shapes, strict=True):
        output.set_shape(shape)
    return outputs


def _in_xla_context() -> bool:
    """Whether the graph being built will be compiled by XLA (tf.function(jit_compile=True))."""
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private module moved: let XLA report it instead
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _loss_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype == tf.float64 else tf.float32


def _raise_label_errors(compute: Callable) -> Callable:
    def checked(*arrays):
        try:
            return compute(*arrays)
        except ValueError as error:
            if "outside the valid range" in str(error):
                raise InvalidLabelError(str(error)) from None
            raise

    return checked


# ----------------------------------------------------------------------------------------
# Fused per-row losses with a kept gradient
# ----------------------------------------------------------------------------------------


def _no_second_derivatives(_):
    raise NotImplementedError("fastxent provides second derivatives for sparse labels with logits only")


def _kept_gradient(logits, grad, hessian_product: Callable):
    """``grad`` as a function of ``logits`` for autodiff: its derivative applied to a vector is
    ``hessian_product(vector)`` (which may raise where second derivatives are not available)."""

    @tf.custom_gradient
    def kept(logits_in):
        def second_order(upstream):
            return tf.cast(hessian_product(upstream), logits_in.dtype)

        return tf.identity(grad), second_order

    return kept(logits)


def _tape_watches(*tensors) -> bool:
    """Whether a gradient tape records operations on any of ``tensors`` now (True when that
    cannot be told: the gradient is then computed, never missing)."""
    return _record is None or bool(_record.should_record_backprop(list(tensors)))


class _KeptGradient:
    """The gradient a forward call computed, with the host array under it (eager mode only).

    A persistent tape may run the backward several times, from several threads at once: the
    kept gradient is handed out under a lock, so that exactly one backward scales it in place,
    and never one whose tensor another backward is still reading.
    """

    def __init__(self):
        self.tensor = None
        self.array: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    def scaled_in_place(self, logits_in, upstream, class_axis: int):
        """(scaled, tensor): the kept gradient scaled in place by the incoming per-row gradient
        and handed out (a later backward computes its own), or None and the kept tensor (None
        once handed out) when scaling in place is not safe: a tape recording the backward
        (second derivatives), a graph, a device array, a dtype, a class axis or a buffer that
        cannot be scaled in place, or a gradient already handed out. A tensor returned for
        reading is never scaled in place afterwards."""
        with self._lock:
            array, tensor = self.array, self.tensor
            if (
                not isinstance(array, np.ndarray)
                or not tf.executing_eagerly()
                or array.dtype not in SCALABLE_DTYPES
                or class_axis != array.ndim - 1
                or not np.shares_memory(array, _to_array(tensor))
                or _tape_watches(logits_in, upstream)
            ):
                # The reader keeps the tensor: no later backward may scale it under it.
                self.array = None
                return None, tensor
            # Handed over: any other backward, now or later, finds nothing kept.
            self.tensor, self.array = None, None
        factors = _to_array(upstream).reshape(-1)
        if not np.all(factors == 1):
            scale_rows_(array.reshape(-1, array.shape[-1]), factors)
        return tensor, None


@tf.autograph.experimental.do_not_convert
def sparse_per_row(logits, labels, *, from_logits: bool = True, ignore_index: Optional[int] = None, axis: int = -1):
    """Per-row sparse cross-entropy (the labels' shape, float32/float64) with a fused gradient.

    Rows whose label equals ``ignore_index`` have loss 0 and gradient 0.

    In eager mode under a tape watching ``logits`` the forward call computes the loss and the
    gradient in one pass, and the backward scales that gradient in place by the incoming
    per-row gradient. Otherwise (graphs, so ``model.fit``; forward-mode accumulators) the
    forward computes the loss alone and the backward computes the gradient with the incoming
    per-row gradient folded into the kernel as row weights: one pass each, and no N x C
    multiply. Gradients reach TensorFlow without a copy (DLPack, from a pool of aligned
    buffers).
    """
    logits = tf.convert_to_tensor(logits)
    labels = tf.convert_to_tensor(labels)
    rank = logits.shape.rank
    class_axis = axis % rank if rank else axis
    loss_dtype = _loss_dtype(logits.dtype)
    options = dict(from_logits=from_logits, reduction="none", ignore_index=ignore_index, axis=class_axis)
    kept = _KeptGradient()
    eager = tf.executing_eagerly()

    def loss_only(logits_array, labels_array):
        return (sparse_cross_entropy(logits_array, labels_array, **options),)

    def loss_and_grad(logits_array, labels_array):
        out = host_output_like(logits_array)
        loss, grad = sparse_cross_entropy_with_grad(logits_array, labels_array, out=out, **options)
        if eager:
            kept.array = grad
        return loss, grad

    def weighted_grad(logits_array, labels_array, upstream_array):
        out = host_output_like(logits_array)
        _, grad = sparse_cross_entropy_with_grad(
            logits_array, labels_array, out=out, sample_weight=upstream_array, **options
        )
        return (grad,)

    def counted_rows():
        """1 for rows that count, 0 for ignored rows, in the loss dtype, with a class axis."""
        if ignore_index is None:
            return tf.ones_like(tf.expand_dims(labels, class_axis), dtype=loss_dtype)
        counted = tf.cast(tf.not_equal(labels, tf.cast(ignore_index, labels.dtype)), loss_dtype)
        return tf.expand_dims(counted, class_axis)

    def hessian_product(vector, logits_in):
        """H v per row in the loss dtype: p * v - p * sum(p * v), ignored rows 0."""
        # p is recomputed in float32 or wider: taking it from the kept gradient (grad + onehot)
        # would lose the label's probability to the rounding of p - 1 in half precision.
        probs = tf.nn.softmax(tf.cast(logits_in, loss_dtype), axis=class_axis) * counted_rows()
        wide = tf.cast(vector, loss_dtype)
        return probs * wide - probs * tf.reduce_sum(probs * wide, axis=class_axis, keepdims=True)

    def weighted_gradient(logits_in, upstream):
        """The gradient scaled by ``upstream``, computed by one fused call, differentiable."""

        @tf.custom_gradient
        def weighted(logits_w, upstream_w):
            (grad,) = host_call(
                _raise_label_errors(weighted_grad),
                [logits_w, labels, tf.cast(upstream_w, loss_dtype)],
                [logits_w.dtype],
                [logits_w.shape],
            )

            def second_order(vector):
                if not from_logits:
                    _no_second_derivatives(vector)
                up = tf.expand_dims(tf.cast(upstream_w, loss_dtype), class_axis)
                d_logits = up * hessian_product(vector, logits_w)
                # d grad / d upstream is the unscaled gradient softmax - onehot (0 if ignored).
                probs = tf.nn.softmax(tf.cast(logits_w, loss_dtype), axis=class_axis)
                onehot = tf.one_hot(labels, tf.shape(logits_w)[class_axis], axis=class_axis, dtype=loss_dtype)
                unit = (probs - onehot) * counted_rows()
                d_upstream = tf.reduce_sum(unit * tf.cast(vector, loss_dtype), axis=class_axis)
                return tf.cast(d_logits, logits_w.dtype), tf.cast(d_upstream, upstream_w.dtype)

            return grad, second_order

        return weighted(logits_in, upstream)

    want_grad = eager and _tape_watches(logits)

    @tf.custom_gradient
    def fused(logits_in):
        if want_grad:
            loss, kept.tensor = host_call(
                _raise_label_errors(loss_and_grad),
                [logits_in, labels],
                [loss_dtype, logits_in.dtype],
                [labels.shape, logits_in.shape],
            )
        else:
            (loss,) = host_call(_raise_label_errors(loss_only), [logits_in, labels], [loss_dtype], [labels.shape])

        def backward(upstream):
            scaled, tensor = kept.scaled_in_place(logits_in, upstream, class_axis)
            if scaled is not None:
                return scaled
            if tensor is None:
                return weighted_gradient(logits_in, upstream)
            # A tape records this backward (second derivatives): the kept gradient times the
            # incoming one, each differentiable.
            if from_logits:
                hessian = functools.partial(hessian_product, logits_in=logits_in)
            else:
                hessian = _no_second_derivatives
            held = _kept_gradient(logits_in, tensor, hessian)
            return held * tf.expand_dims(tf.cast(upstream, held.dtype), class_axis)

        return loss, backward

    return fused(logits)


@tf.autograph.experimental.do_not_convert
def dense_per_row(logits, targets, *, from_logits: bool = True, label_smoothing: float = 0.0, axis: int = -1):
    """Per-row categorical cross-entropy against dense ``targets`` with a fused gradient.

    As ``tf.nn.softmax_cross_entropy_with_logits`` for logits (whose gradient is softmax - targets
    even for target rows that do not sum to 1), Keras' clipped formula for probabilities. The
    gradient flows to ``logits`` only (``targets`` are data: their gradient is None).
    """
    logits = tf.convert_to_tensor(logits)
    targets = tf.convert_to_tensor(targets)
    rank = logits.shape.rank
    class_axis = axis % rank if rank else axis
    row_shape = logits.shape[:class_axis] + logits.shape[class_axis + 1 :]
    loss_dtype = _loss_dtype(logits.dtype)

    def compute(logits_array, targets_array):
        # With logits the gradient is TensorFlow's softmax - targets (what its op returns; the
        # exact derivative has (sum of the row's targets) * softmax, equal for rows summing to 1).
        return _dense_api.run(
            logits_array,
            targets_array,
            want_grad=True,
            from_logits=from_logits,
            reduction="none",
            label_smoothing=label_smoothing,
            class_weight=None,
            sample_weight=None,
            axis=class_axis,
            unit_mass_grad=from_logits,
        )

    def targets_gradient(logits_in, up):
        # The loss is linear in the targets: d loss / d t_c = -(1 - eps) log q_c, with q the
        # softmax of the logits, or Keras' clipped normalised probabilities.
        wide = tf.cast(logits_in, loss_dtype)
        if from_logits:
            log_q = tf.nn.log_softmax(wide, axis=class_axis)
        else:
            # Keras' epsilon() bounds, rounded to the compute type as the kernels hold them.
            normalised = wide / tf.reduce_sum(wide, axis=class_axis, keepdims=True)
            log_q = tf.math.log(tf.clip_by_value(normalised, PROB_EPS, PROB_ONE_MINUS_EPS))
        return tf.cast(-(1.0 - label_smoothing) * log_q * tf.cast(up, loss_dtype), targets.dtype)

    # The targets' gradient costs a pass over N x C: in eager mode it is computed only when a
    # tape watches the targets; graphs compute it always and prune it when nothing reads it.
    targets_differentiated = targets.dtype.is_floating and (
        not tf.executing_eagerly() or _record is None or _record.should_record_backprop([targets])
    )

    @tf.custom_gradient
    def fused(logits_in, targets_in):
        loss, grad = host_call(
            compute, [logits_in, targets_in], [loss_dtype, logits_in.dtype], [row_shape, logits_in.shape]
        )

        def backward(upstream):
            held = _kept_gradient(logits_in, grad, _no_second_derivatives)
            up = tf.expand_dims(upstream, class_axis)
            grad_targets = targets_gradient(logits_in, up) if targets_differentiated else None
            return held * tf.cast(up, held.dtype), grad_targets

        return loss, backward

    return fused(logits, targets if targets_differentiated else tf.stop_gradient(targets))


# ----------------------------------------------------------------------------------------
# The tf.nn drop-in
# ----------------------------------------------------------------------------------------


@tf.autograph.experimental.do_not_convert
def sparse_softmax_cross_entropy_with_logits(labels, logits, name: Optional[str] = None):
    """``tf.nn.sparse_softmax_cross_entropy_with_logits``, computed by fastxent's fused kernel.

    Args:
        labels: int32/int64 class indices, the logits' shape without the last axis.
        logits: float16/bfloat16/float32/float64 logits, classes on the last axis.
        name: a name scope for the operations.

    Returns:
        Per-row losses with the labels' shape and the logits' dtype. A label outside [0, C)
        raises ``InvalidLabelError`` (a ``ValueError`` and an ``InvalidArgumentError``) naming it;
        inside a ``tf.function`` TensorFlow reports it as an ``InvalidArgumentError`` with that text.
    """
    with tf.name_scope(name or "SparseSoftmaxCrossEntropyWithLogits"):
        logits = tf.convert_to_tensor(logits)
        labels = tf.convert_to_tensor(labels)
        if not labels.dtype.is_integer:
            raise TypeError(f"labels must be int32 or int64 class indices; got {labels.dtype.name}")
        if not logits.dtype.is_floating:
            raise TypeError(f"logits must be floating point; got {logits.dtype.name}")
        if logits.shape.rank is not None and labels.shape.rank is not None:
            if logits.shape.rank == 0:
                raise ValueError(f"Logits cannot be scalars - received shape {logits.shape}.")
            if labels.shape.rank != logits.shape.rank - 1:
                raise ValueError(
                    f"Rank mismatch: Rank of labels (received {labels.shape.rank}) should equal rank of "
                    f"logits minus 1 (received {logits.shape.rank})."
                )
            if not labels.shape.is_compatible_with(logits.shape[:-1]):
                raise ValueError(
                    f"labels shape {labels.shape} must equal logits shape without the last "
                    f"dimension, {logits.shape[:-1]}"
                )
        loss = sparse_per_row(logits, labels, from_logits=True, axis=-1)
        return tf.cast(loss, logits.dtype)
