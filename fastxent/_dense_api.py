"""Cross-entropy against dense targets (one-hot or soft label rows): validate, normalise, dispatch.

The per-row loss, with the per-class target mass ``a_c = w_c ((1 - eps) t_c + eps / C)``
(class weights ``w``, label smoothing ``eps`` as Keras' and PyTorch's), is

    from_logits=True    sum_c a_c (logsumexp(x) - x_c)          gradient (sum_c a_c) softmax(x) - a
    from_logits=False   -sum_c a_c log clip(p_c / sum_c' p_c)   (Keras' categorical_crossentropy)

A class with no target mass contributes exactly 0, also where its logit is -inf (TensorFlow and
PyTorch return NaN there: 0 * -inf). With one-hot targets the loss equals the sparse one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastxent import _checks as checks
from fastxent._checks import Reduction
from fastxent._options import KernelOptions


def _dense_launcher(backend):
    launch = getattr(backend.launcher, "fused_dense_xent", None)
    if launch is not None:
        return launch
    if backend.name == "cpu":
        from fastxent.cpu import dense

        return dense.fused_dense_xent
    raise NotImplementedError(
        f"dense targets have no {backend.name.upper()} kernel yet: pass NumPy arrays, or use "
        "sparse_cross_entropy with class indices"
    )


def run(
    logits,
    targets,
    *,
    want_grad,
    from_logits,
    reduction,
    label_smoothing,
    class_weight,
    sample_weight,
    axis,
    unit_mass_grad=False,
):
    """The shared body of the public functions, for the adapters too. ``unit_mass_grad`` (for
    the TensorFlow adapter): the gradient TensorFlow's softmax_cross_entropy_with_logits returns,
    softmax - targets, which differs from the derivative when target rows do not sum to 1."""
    checks.check_options(from_logits, reduction, label_smoothing)
    backend = checks.backend_for(logits)
    xp, logits = checks.as_logits(logits, backend)
    launch = _dense_launcher(backend)
    axis = checks.normalise_axis(axis, logits.ndim)
    num_classes = checks.check_num_classes(logits, axis)
    targets = xp.asarray(targets)
    if targets.dtype.kind not in "fiub" and targets.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"targets must be numbers (one-hot or probability rows); got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the logits shape {tuple(logits.shape)}")
    # The kernels read targets in the logits' storage type; other dtypes are converted (a copy
    # of the targets, never of the logits).
    if targets.dtype != logits.dtype:
        targets = targets.astype(logits.dtype)
    lead_shape = checks.lead_shape_of(logits.shape, axis)
    num_rows = int(np.prod(lead_shape, dtype=np.int64))

    weights = checks.class_weights(class_weight, num_classes, xp)
    row_weight = checks.row_weights(sample_weight, lead_shape, xp, rows_name="the rows' shape")

    # The scalars the host needs, read back together (one synchronisation on a GPU).
    device_scalars = checks.hint_scalars(logits, axis, from_logits, xp)
    if weights is not None:
        device_scalars["weight_total"] = weights.sum()
    if reduction == "mean":
        device_scalars["denominator"] = row_weight.sum()
    host = checks.to_host(device_scalars, xp)
    checks.warn_if_probabilities(host, logits.dtype, num_classes)
    denominator = float(num_rows) if reduction == "sum_over_batch_size" else host.get("denominator", 1.0)
    options = KernelOptions(
        from_logits=bool(from_logits),
        label_smoothing=float(label_smoothing),
        z_loss=0.0,
        softcap=None,
        class_weight=weights,
        class_weight_total=host["weight_total"] if weights is not None else float(num_classes),
        num_classes=num_classes,
        grad_scale=checks.grad_scale_for(denominator),
    )
    rows = checks.rows_view(logits, axis, xp)
    target_rows = checks.rows_view(targets, axis, xp)
    launch_options = {"unit_mass_grad": True} if unit_mass_grad else {}
    per_row, grad_rows, row_min = launch(rows, target_rows, row_weight, options, want_grad=want_grad, **launch_options)
    if row_min is not None:
        checks.reject_negative_probabilities(row_min, lead_shape, xp)
    loss = checks.reduce_loss(per_row, reduction, denominator, lead_shape, checks.loss_dtype(logits.dtype), xp)
    if not want_grad:
        return loss
    return loss, checks.grad_like(grad_rows, lead_shape, axis, xp)


def categorical_cross_entropy(
    logits: Any,
    targets: Any,
    *,
    from_logits: bool = True,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    axis: int = -1,
):
    """Categorical cross-entropy against dense target rows, in one fused sweep per row.

    Args:
        logits: float16/bfloat16/float32/float64 array with the classes on ``axis``.
        targets: one-hot or probability rows, the logits' shape (other dtypes are converted to
            the logits' dtype).
        from_logits: False when ``logits`` are probabilities (Keras: each row divided by its sum,
            clipped to [1e-7, 1 - 1e-7]). Negative values then raise ``ValueError``.
        reduction: "none" (per-row losses), "sum", "mean" (divided by the sum of the sample
            weights, the row count without them; class weights do not enter the divisor, as in
            PyTorch with probability targets), or "sum_over_batch_size" (divided by the row count,
            Keras' default). A zero divisor gives 0.0.
        label_smoothing: eps in [0, 1): targets become ``(1 - eps) t + eps / C``.
        class_weight: (C,) weight per class, multiplying each class's target mass.
        sample_weight: weight per row, broadcastable to the logits' shape without the class axis.
        axis: the class axis.

    Returns:
        The loss: float32 (float64 for float64 logits); 0-d, or the rows' shape for "none".
    """
    return run(
        logits,
        targets,
        want_grad=False,
        from_logits=from_logits,
        reduction=reduction,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        axis=axis,
    )


def categorical_cross_entropy_with_grad(
    logits: Any,
    targets: Any,
    *,
    from_logits: bool = True,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    axis: int = -1,
):
    """Loss and d(loss)/d(logits) in the same fused call; arguments of ``categorical_cross_entropy``.

    With reduction "none" the gradient is that of the sum of the per-row losses.

    Returns:
        (loss, grad): the loss as ``categorical_cross_entropy`` returns it, and the gradient with
        the logits' shape and dtype.
    """
    return run(
        logits,
        targets,
        want_grad=True,
        from_logits=from_logits,
        reduction=reduction,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        axis=axis,
    )
