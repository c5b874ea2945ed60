"""Host-side checks of a call on NumPy arrays, compiled: the labels' range check and encoding,
the reduction's denominator and the softmax hint (see ``fastxent._api``)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastxent.cpu import _target_kernels
from fastxent.cpu.storage import storage_view

__all__ = ["encode_labels"]


def encode_labels(
    flat: np.ndarray,
    num_classes: int,
    ignore_index: Optional[int],
    class_weight: Optional[np.ndarray],
    row_weight: np.ndarray,
    hint_row: Optional[np.ndarray] = None,
) -> Optional[Tuple[np.ndarray, int, int, float, dict]]:
    """The labels checked and encoded in one pass.

    Returns (int64 labels with -1 for ignored rows, position of the first label outside
    [0, num_classes) that is not ignored or -1, counted rows, sum over counted rows of
    row_weight * class_weight[label], the softmax hint's scalars of ``hint_row``), or None
    for labels this pass does not take (uint64, left to NumPy, which compares them with int64
    exactly).

    ``hint_row``: a contiguous row of logits, or None. Its scalars are those of
    ``fastxent._checks.hint_scalars``: {} when a value lies outside [0, 1], else whether the
    row lies in [0, 1] (True) and its float64 sum.
    """
    if flat.dtype == np.uint64:
        return None
    has_ignore = ignore_index is not None and -(2**63) <= ignore_index < 2**63
    encoded = np.empty(flat.shape[0], dtype=np.int64)
    first_bad, counted, weight_sum, in_unit, row_sum = _target_kernels.encode_labels(
        flat,
        num_classes,
        has_ignore,
        int(ignore_index) if has_ignore else 0,
        class_weight,
        row_weight,
        None if hint_row is None else storage_view(hint_row),
        encoded,
    )
    hint = {"first_row_in_unit": True, "first_row_sum": row_sum} if in_unit else {}
    return encoded, int(first_bad), int(counted), float(weight_sum), hint
