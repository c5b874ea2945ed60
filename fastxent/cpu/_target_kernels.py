"""Numba kernels of the host-side checks (private: ``targets.py`` calls these).

The public API checks the labels and reads a few scalars (the reduction's denominator, the
softmax hint) on every call. On NumPy arrays these were a dozen small NumPy calls, each with a
fixed cost of about a microsecond whatever the size; here they are one compiled call.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fastxent._range import IGNORED
from fastxent.cpu._bits import to_compute
from fastxent.cpu._kernels import weight_at


@njit(cache=True, error_model="numpy")
def unit_row_sum(row):
    """(all values in [0, 1], their float64 sum) of a row of logits (storage type); the sum is
    0.0 when a value lies outside. The loop stops there: real logits leave [0, 1] within a few
    values, so the usual call reads a handful of them."""
    total = 0.0
    for j in range(row.shape[0]):
        value = np.float64(to_compute(row[j]))
        if not (value >= 0.0 and value <= 1.0):  # NaN is outside too
            return False, 0.0
        total += value
    return True, total


@njit(cache=True, error_model="numpy")
def encode_labels(labels, num_classes, has_ignore, ignore_index, class_weight, row_weight, hint_row, encoded):
    """Check and encode flat labels in one pass; the softmax hint of ``hint_row`` on the way.

    Writes ``encoded`` (int64 (N,)): the label, or IGNORED where it equals ``ignore_index``
    (when ``has_ignore``). Stops at the first label outside [0, num_classes) that is not
    ignored. ``labels`` may be any integer type but uint64 (whose comparisons with int64
    Numba would take in float64); ``ignore_index`` and ``num_classes`` are int64.

    Returns (position of the first bad label or -1, number of counted rows, sum over counted
    rows of row_weight * class_weight[label], ``unit_row_sum(hint_row)`` or (False, 0.0)
    when ``hint_row`` is None).
    """
    in_unit, row_sum = False, 0.0
    if hint_row is not None:
        in_unit, row_sum = unit_row_sum(hint_row)
    counted = 0
    weight_sum = 0.0
    for i in range(labels.shape[0]):
        label = labels[i]
        if has_ignore and label == ignore_index:
            encoded[i] = IGNORED
            continue
        if label < 0 or label >= num_classes:
            return i, counted, weight_sum, in_unit, row_sum
        encoded[i] = label
        counted += 1
        weight_sum += row_weight[i] * weight_at(class_weight, np.int64(label))
    return -1, counted, weight_sum, in_unit, row_sum
