"""How the CPU kernels see an array's memory: half precision as the integer bits they decode."""

from __future__ import annotations

import numpy as np

try:  # bfloat16 comes from ml_dtypes; without it there are simply no bfloat16 arrays.
    from ml_dtypes import bfloat16 as BFLOAT16
except ImportError:  # pragma: no cover - ml_dtypes is a runtime dependency
    BFLOAT16 = None


def storage_view(array: np.ndarray) -> np.ndarray:
    """View half-precision arrays as the integer bit patterns the kernels decode.

    float16 -> int16, bfloat16 -> uint16 (see ``_bits.py``); float32/float64 unchanged.
    """
    if array.dtype.char in "fd":  # float32, float64: the usual case, without comparing dtypes
        return array
    if array.dtype == np.float16:
        return array.view(np.int16)
    if BFLOAT16 is not None and array.dtype == BFLOAT16:
        return array.view(np.uint16)
    return array
