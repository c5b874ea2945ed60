"""CUDA launchers of the per-token statistics (``xent_token_stats_*``, ``xent_token_grad_*`` in
``xent.cu``): one block per row, everything on the device, as ``fastxent.cpu.stats`` on the CPU.

Rows are C-contiguous (N, W) CuPy arrays of one class range, labels int64 (N,) local to it
(-1 ignored, -2 a target elsewhere).
"""

from __future__ import annotations

from typing import Optional

import cupy
import numpy

from fastxent._token_range import TokenRowStats
from fastxent.gpu import xent
from fastxent.gpu._names import kernel_name

__all__ = ["token_grad", "token_row_stats"]


def _grid_and_threads(rows, want_grad: bool):
    num_rows, width = rows.shape
    num_vectors = width * rows.dtype.itemsize // xent.VECTOR_BYTES
    cap = xent.MAX_THREADS if want_grad else xent.FORWARD_MAX_THREADS
    return (min(num_rows, 2**31 - 1),), (xent.threads_for(num_vectors, cap),)


def token_row_stats(rows, labels, temperature: float, softcap: Optional[float], storage: Optional[str] = None):
    """``fastxent._token_range.TokenRowStats`` of rows (N, W) on the device (float64 and int64
    (N,) CuPy arrays). ``storage``: "bfloat16" for uint16 rows holding bfloat16 bits."""
    num_rows, width = rows.shape
    outputs = cupy.empty((5, num_rows), dtype=cupy.float64)
    argmax = cupy.zeros(num_rows, dtype=cupy.int64)
    if num_rows and width:
        name = kernel_name("token_stats", xent.storage_name(rows.dtype, storage), softcap is not None)
        grid, threads = _grid_and_threads(rows, want_grad=False)
        xent.get_kernel(name)(
            grid,
            threads,
            (
                rows,
                cupy.ascontiguousarray(labels, dtype=cupy.int64),
                numpy.int64(num_rows),
                numpy.int64(width),
                numpy.float64(softcap or 0.0),
                numpy.float64(1.0 / temperature),
                outputs,
                argmax,
            ),
        )
    elif num_rows:  # an empty range: the merge's identity
        outputs[...] = cupy.asarray([-numpy.inf, 0.0, 0.0, 0.0, -numpy.inf])[:, None]
    return TokenRowStats(*outputs, argmax)


def token_grad(
    rows,
    labels,
    stats: TokenRowStats,
    grad_logprob,
    grad_entropy,
    grad_lse,
    temperature: float,
    softcap: Optional[float],
    *,
    inplace: bool = False,
    out=None,
    storage: Optional[str] = None,
):
    """Gradient of sum(a logprob + b entropy + c lse) w.r.t. rows (N, W) from statistics merged
    over the whole vocabulary (see ``fastxent.cpu.stats.token_grad``); a new array like
    ``rows`` (``out`` when given), or ``rows`` itself when ``inplace``."""
    num_rows, width = rows.shape
    grad = rows if inplace else (xent.empty_rows_like(rows) if out is None else out)
    if num_rows == 0 or width == 0:
        return grad
    row_stats = cupy.stack([cupy.asarray(s, dtype=cupy.float64) for s in stats[:3]])
    a = cupy.asarray(grad_logprob, dtype=cupy.float64)
    upstream = cupy.stack([a, a - cupy.asarray(grad_lse, dtype=cupy.float64), cupy.asarray(grad_entropy, cupy.float64)])
    name = kernel_name("token_grad", xent.storage_name(rows.dtype, storage), softcap is not None)
    grid, threads = _grid_and_threads(rows, want_grad=True)
    xent.get_kernel(name)(
        grid,
        threads,
        (
            rows,
            grad,
            cupy.ascontiguousarray(labels, dtype=cupy.int64),
            numpy.int64(num_rows),
            numpy.int64(width),
            numpy.float64(softcap or 0.0),
            numpy.float64(1.0 / temperature),
            cupy.ascontiguousarray(row_stats),
            cupy.ascontiguousarray(upstream),
        ),
    )
    return grad
