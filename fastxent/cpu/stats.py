"""CPU launchers of the per-token statistics: allocate outputs, pick the kernel, call it.

Rows are C-contiguous (N, W) arrays of one class range (the whole vocabulary for the public
API), labels int64 (N,) local to the range (``fastxent._range.local_labels``; -1 ignored).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from fastxent._token_range import TokenRowStats
from fastxent.cpu import _stats_kernels
from fastxent.cpu.storage import storage_view
from fastxent.cpu.xent import SERIAL_WORK

__all__ = ["NumpyTokenKernel", "token_grad", "token_row_stats"]


def token_row_stats(
    rows: np.ndarray, labels: np.ndarray, temperature: float, softcap: Optional[float]
) -> TokenRowStats:
    """Statistics (``fastxent._token_range.TokenRowStats``, float64 and int64 (N,)) of rows
    (N, W) of float16/bfloat16/float32/float64 logits, one sweep per row."""
    num_rows, width = rows.shape
    outputs = np.empty((5, num_rows))
    argmax = np.zeros(num_rows, dtype=np.int64)
    if num_rows and width:
        kernel = _stats_kernels.stats_rows_serial if num_rows * width <= SERIAL_WORK else _stats_kernels.stats_rows
        kernel(storage_view(rows), labels, softcap, 1.0 / temperature, outputs, argmax)
    elif num_rows:  # an empty range: the merge's identity
        outputs[:] = np.array([-np.inf, 0.0, 0.0, 0.0, -np.inf])[:, None]
    return TokenRowStats(*outputs, argmax)


def token_grad(
    rows: np.ndarray,
    labels: np.ndarray,
    stats: TokenRowStats,
    grad_logprob: np.ndarray,
    grad_entropy: np.ndarray,
    grad_lse: np.ndarray,
    temperature: float,
    softcap: Optional[float],
    *,
    inplace: bool = False,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Gradient of sum(grad_logprob * logprob + grad_entropy * entropy + grad_lse * lse) w.r.t.
    rows (N, W) of a class range.

    ``stats`` merged over the whole vocabulary; the upstream gradients float64 (N,). IGNORED
    rows get 0 (the caller makes them ELSEWHERE, with a = b = 0, where their lse has a gradient).
    Returns a new array like ``rows`` (``out`` when given), or ``rows`` itself holding the
    gradient when ``inplace``.
    """
    num_rows, width = rows.shape
    grad = rows if inplace else (np.empty_like(rows) if out is None else out)
    if num_rows == 0 or width == 0:
        return grad
    source = storage_view(rows)
    dest = True if inplace else storage_view(grad)
    kernel = _stats_kernels.grad_rows_serial if num_rows * width <= SERIAL_WORK else _stats_kernels.grad_rows
    kernel(
        source,
        dest,
        labels,
        softcap,
        1.0 / temperature,
        np.ascontiguousarray(stats.row_max, dtype=np.float64),
        np.ascontiguousarray(stats.sum_exp, dtype=np.float64),
        np.ascontiguousarray(stats.centred_sum, dtype=np.float64),
        np.ascontiguousarray(grad_logprob, dtype=np.float64),
        np.ascontiguousarray(grad_logprob - grad_lse, dtype=np.float64),
        np.ascontiguousarray(grad_entropy, dtype=np.float64),
    )
    return grad


class NumpyTokenKernel:
    """Statistics and gradient of a class range of NumPy rows (what ``fastxent._linear``'s
    token schedule asks of a backend)."""

    stats = staticmethod(token_row_stats)
    grad = staticmethod(token_grad)
