"""In-place per-row scaling of an (N, C) array: ``rows[i] *= factors[i]``.

Adapters whose framework hands the backward pass a per-row incoming gradient (TensorFlow's
per-row losses) apply it to the gradient the forward kept, in the buffer the kept gradient
already occupies: no second N x C buffer, whose first touch costs as much as the scaling.
"""

from __future__ import annotations

import numba
import numpy as np

from fastxent.cpu import _threading  # noqa: F401  (selects a fork- and thread-safe layer first)

SCALABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@numba.njit(parallel=True, cache=True, nogil=True)
def _scale_rows(rows, factors):
    for i in numba.prange(rows.shape[0]):
        factor = factors[i]
        row = rows[i]
        for j in range(row.shape[0]):
            row[j] *= factor


def scale_rows_(rows: np.ndarray, factors: np.ndarray) -> None:
    """Multiply row ``i`` of ``rows`` by ``factors[i]``, in place.

    Args:
        rows: C-contiguous, writeable (N, C) float32 or float64 array.
        factors: (N,) array, converted to ``rows``' dtype (the product is rounded as the
            framework's own multiply in that dtype rounds it).
    """
    if rows.dtype not in SCALABLE_DTYPES or rows.ndim != 2 or not rows.flags.c_contiguous:
        raise ValueError(f"rows must be a C-contiguous 2-d float32/float64 array; got {rows.dtype}, {rows.shape}")
    if not rows.flags.writeable:
        raise ValueError("rows must be writeable")
    factors = np.ascontiguousarray(factors, dtype=rows.dtype).reshape(-1)
    if factors.shape[0] != rows.shape[0]:
        raise ValueError(f"factors has {factors.shape[0]} entries for {rows.shape[0]} rows")
    if rows.size:
        _scale_rows(rows, factors)
