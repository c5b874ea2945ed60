"""The CUDA backend of the range layer (``fastxent._range``): per-row statistics over one class
range on the GPU, and the range's gradient from merged statistics, for vocabulary-parallel shards.

A shard holds columns [vocab_start, vocab_start + W) of every row. ``range_stats`` reduces its
(N, W) logits to the per-row statistics of ``fastxent._range.RowStats`` with the split
path's kernel in class-range mode (``xent_part_stats_*``: blocks per (row, part), merged by the
row's last block, no epilogue), and brings the O(N) numbers to the host in one transfer, where
the collectives and the epilogue run. ``range_grad`` sends the per-row coefficients back and
writes the gradient with ``xent_part_grad_*``. Labels are local, as ``local_labels`` makes them:
the offset of the target in the range, IGNORED (-1), or ELSEWHERE (-2) when the target lies in
another shard (the row still gets its statistics and its softmax gradient, without the target
term).

Probability inputs (``from_logits=False``) have no range kernel: callers use another path.
"""

from __future__ import annotations

from typing import Optional

import numpy

from fastxent import _range
from fastxent._options import KernelOptions
from fastxent._range import ELSEWHERE, IGNORED, RowCoefficients, RowStats
from fastxent.gpu import xent
from fastxent.gpu.xent import cupy

# gridDim.y, which indexes rows in the part kernels, stops at 65535: longer batches go in chunks.
MAX_GRID_ROWS = xent.MAX_GRID_ROWS

__all__ = ["CupyKernel", "range_grad", "range_stats", "ELSEWHERE", "IGNORED"]


def _layout(num_rows: int, width: int, dtype_name: str):
    """(part_len, num_parts, threads) of the part kernels for rows of ``width`` classes."""
    part_len = xent.split_part_length(num_rows, width, xent.current_limits())
    num_parts = -(-width // part_len)
    threads = xent.threads_for(part_len * xent.itemsize(dtype_name) // xent.VECTOR_BYTES)
    return part_len, num_parts, threads


def _weights_elem(options: KernelOptions, dtype_name: str):
    """This range's class weights in the compute type, where the sweeps read them (smoothing)."""
    return xent.class_weight_arrays(options, dtype_name)[1]


def _check(rows, options: KernelOptions) -> None:
    if not options.from_logits:
        raise NotImplementedError("the GPU class-range kernels take logits, not probabilities")
    if rows.ndim != 2 or not rows.flags.c_contiguous:
        raise ValueError(f"rows must be a C-contiguous (N, W) array; got shape {tuple(rows.shape)}")
    if rows.shape[1] > xent.MAX_CLASSES:
        raise ValueError(f"the GPU kernels index classes with 32-bit integers: W = {rows.shape[1]} is too large")


def range_stats(rows, labels, options: KernelOptions, *, storage: Optional[str] = None) -> RowStats:
    """Statistics of CuPy rows (N, W) of one class range, as NumPy float64 arrays (N,).

    Args:
        rows: C-contiguous (N, W) logits, float16/bfloat16/float32/float64 (or uint16 holding
            bfloat16 bits, with ``storage="bfloat16"``).
        labels: int64 (N,) local labels (NumPy or CuPy; see the module docstring).
        options: ``class_weight`` this range's (W,) weights or None; ``softcap`` and
            ``label_smoothing`` (which asks for the weighted sum) as in the core API.
        storage: kernel dtype name overriding ``rows.dtype``.

    Returns:
        ``RowStats`` on the host: row_max, sum_exp (relative to row_max), weighted_sum,
        target_value (v_y, softcapped) and target_input (x_y) where the target lies here (0
        elsewhere), row_min +inf (logits have none). Ignored rows hold the identity.
    """
    _check(rows, options)
    num_rows, width = rows.shape
    dtype_name = xent.storage_name(rows.dtype, storage)
    host = numpy.zeros((5, num_rows))
    host[0] = -numpy.inf
    if num_rows and width:
        with rows.device:  # the kernels, the counters and the launch on the rows' device
            labels = xent.contiguous(cupy.asarray(labels), numpy.int64)
            part_len, num_parts, threads = _layout(num_rows, width, dtype_name)
            kernel = xent.get_kernel(xent.kernel_name("part_stats", dtype_name, options.softcap is not None))
            weights = _weights_elem(options, dtype_name)
            device = cupy.empty((5, num_rows), dtype=cupy.float64)
            for lo in range(0, num_rows, MAX_GRID_ROWS):
                hi = min(lo + MAX_GRID_ROWS, num_rows)
                # The kernel writes five contiguous planes of the launch's rows.
                chunk = device if hi - lo == num_rows else cupy.empty((5, hi - lo), dtype=cupy.float64)
                part_stats = cupy.empty(3 * (hi - lo) * num_parts, dtype=cupy.float64)
                xent.launch_part_stats(
                    kernel,
                    num_parts,
                    threads,
                    rows[lo:hi],
                    labels[lo:hi],
                    None,
                    None,
                    weights,
                    part_len,
                    options,
                    part_stats,
                    xent.row_counters(hi - lo),
                    None,
                    None,
                    range_stats=chunk,
                )
                if chunk is not device:
                    device[:, lo:hi] = chunk
            host = device.get()  # the one device-to-host transfer
    return RowStats(
        row_max=host[0],
        sum_exp=host[1],
        target_value=host[3],
        target_input=host[4],
        weighted_sum=host[2],
        row_min=numpy.full(num_rows, numpy.inf),
    )


def _row_coefs(labels, stats: RowStats, coefs: RowCoefficients, target_weight, options: KernelOptions):
    """(N, 4) float64 per row for xent_part_grad, on the device: reference (row max, or 0 at
    -inf), coef_p, coef_w, and the whole gradient at the target, formed in float64 by the range
    layer's ``target_grads`` with CuPy (the per-row numbers go over in one transfer)."""
    host = numpy.stack(
        [
            stats.row_max,
            stats.target_value,
            stats.target_input,
            coefs.coef_p,
            coefs.coef_t,
            coefs.coef_w,
            numpy.asarray(target_weight, numpy.float64),
        ]
    )
    row_max, target_value, target_input, coef_p, coef_t, coef_w, weight = cupy.asarray(host)
    zeros = cupy.zeros_like(row_max)
    device_stats = RowStats(row_max, zeros, target_value, target_input, zeros, zeros)
    device_coefs = RowCoefficients(zeros, coef_p, coef_t, coef_w)
    row_coefs = cupy.empty((labels.shape[0], 4), dtype=cupy.float64)
    row_coefs[:, 0] = cupy.where(row_max > -numpy.inf, row_max, 0.0)
    row_coefs[:, 1] = coef_p
    row_coefs[:, 2] = coef_w
    row_coefs[:, 3] = _range.target_grads(labels, device_stats, device_coefs, weight, options, xp=cupy)
    return row_coefs


def range_grad(
    rows,
    labels,
    stats: RowStats,
    coefs: RowCoefficients,
    target_weight,
    options: KernelOptions,
    *,
    inplace: bool = False,
    out=None,
    storage: Optional[str] = None,
):
    """Gradient of the loss w.r.t. CuPy rows (N, W) of one class range, from merged statistics.

    ``stats`` (NumPy) must be merged over the whole vocabulary: the global row max, and the
    target values where the target lies in this range, as ``range_stats`` gives them.
    ``coefs`` and ``target_weight`` come from ``fastxent._range.finish_rows`` and
    ``target_weights``. Returns ``rows`` itself holding the gradient when ``inplace``, else
    ``out`` (a C-contiguous CuPy buffer like ``rows``) or a new array.
    """
    _check(rows, options)
    num_rows, width = rows.shape
    with rows.device:  # the new buffer, the kernels and the launch on the rows' device
        grad = rows if inplace else (xent.empty_rows_like(rows) if out is None else out)
        if num_rows and width:
            _range_grad(
                rows, grad, labels, stats, coefs, target_weight, options, xent.storage_name(rows.dtype, storage)
            )
    return grad


def _range_grad(rows, grad, labels, stats, coefs, target_weight, options, dtype_name) -> None:
    num_rows, width = rows.shape
    labels = xent.contiguous(cupy.asarray(labels), numpy.int64)
    row_coefs = _row_coefs(labels, stats, coefs, target_weight, options)
    part_len, num_parts, threads = _layout(num_rows, width, dtype_name)
    kernel = xent.get_kernel(xent.kernel_name("part_grad", dtype_name, options.softcap is not None))
    weights = _weights_elem(options, dtype_name)
    for lo in range(0, num_rows, MAX_GRID_ROWS):
        hi = min(lo + MAX_GRID_ROWS, num_rows)
        xent.launch_part_grad(
            kernel,
            num_parts,
            threads,
            rows[lo:hi],
            grad[lo:hi],
            labels[lo:hi],
            weights,
            row_coefs[lo:hi],
            part_len,
            options,
        )


class CupyKernel:
    """The range layer's kernel (``fastxent._range.RangeKernel``) for CuPy rows, the counterpart
    of ``fastxent.cpu.xent.NumpyKernel``. ``storage``: see ``range_stats``."""

    def __init__(self, storage: Optional[str] = None):
        self.storage = storage

    def stats(self, rows, labels, options: KernelOptions) -> RowStats:
        return range_stats(rows, labels, options, storage=self.storage)

    def grad(self, rows, labels, stats, coefs, target_weight, options, *, inplace: bool, out=None):
        return range_grad(
            rows, labels, stats, coefs, target_weight, options, inplace=inplace, out=out, storage=self.storage
        )

    def targets(self, rows, labels, options: KernelOptions):
        stats = self.stats(rows, labels, options)
        return stats.target_value, stats.target_input
