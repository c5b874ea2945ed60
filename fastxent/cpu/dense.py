"""CPU launcher for dense targets: allocate outputs, pick the kernel, call it.

Input here is already validated and normalised by ``fastxent._dense_api``: logits and targets
are C-contiguous (N, C) arrays of one dtype, sample weights float64 (N,).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastxent._options import KernelOptions
from fastxent._range import compute_dtype
from fastxent.cpu import (
    _dense_kernels,
    _threading,  # noqa: F401  (selects a fork- and thread-safe layer first)
)
from fastxent.cpu.storage import storage_view


def fused_dense_xent(
    logits: np.ndarray,
    targets: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    *,
    want_grad: bool,
    unit_mass_grad: bool = False,
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Per-row loss and, if asked, the gradient of logits (N, C) against target rows (N, C).

    Args:
        logits: C-contiguous (N, C) float16/bfloat16/float32/float64.
        targets: C-contiguous (N, C), the logits' dtype.
        sample_weight: float64 (N,).
        options: validated options (``z_loss`` and ``softcap`` unused); ``options.grad_scale``
            is the reduction's factor.
        want_grad: also compute d(loss)/d(logits).
        unit_mass_grad: with logits, return softmax - targets as the gradient, as TensorFlow's
            op does (the exact derivative has (sum of the row's targets) * softmax).

    Returns:
        (loss float64 (N,), gradient (N, C) in the logits' dtype or None, row minimum float64
        (N,) for probability inputs or None).
    """
    num_rows, num_classes = logits.shape
    compute = compute_dtype(logits.dtype)
    loss = np.empty(num_rows, dtype=np.float64)
    grad = np.empty_like(logits) if want_grad else None
    class_weight = None if options.class_weight is None else np.ascontiguousarray(options.class_weight, dtype=compute)
    smoothing = options.label_smoothing
    keep = compute.type(1.0 - smoothing)
    uniform = compute.type(smoothing / num_classes)
    args = (
        storage_view(logits),
        storage_view(targets),
        None if grad is None else storage_view(grad),
        class_weight,
        keep,
        uniform,
        sample_weight,
        options.grad_scale,
    )
    if options.from_logits:
        _dense_kernels.logit_rows(*args, bool(unit_mass_grad), loss)
        return loss, grad, None
    row_min = np.empty(num_rows, dtype=np.float64)
    _dense_kernels.prob_rows(*args, loss, row_min)
    return loss, grad, row_min
