"""CUDA launchers: pick the kernel variant, allocate outputs, launch on CuPy's current stream.

Input here is already validated and normalised by ``fastxent._api``, as for the CPU launcher
(``fastxent.cpu.xent``): logits are a C-contiguous (N, C) CuPy array, labels int64 (N,) with -1
for ignored rows, sample weights float64 (N,). Everything stays on the device: no host copies
and no synchronisation (errors are the caller's to report, from ``row_min``).

The kernels live in ``xent.cu`` beside this file: one ``RawModule`` per process, compiled by
NVRTC on first use and cached on disk by CuPy. Each kernel has a typed launcher below that
converts every scalar explicitly (CuPy passes a Python int as ``long long`` and a float as
``double`` without looking at the kernel's signature); the kernels take only 64-bit scalars.

Paths (tunables are module constants so tests and benchmarks can move the thresholds):

* rows: one block per row (``xent_fwd_*``, ``xent_fwd_bwd_*``). For long rows with a gradient
  the grid is capped at ``FUSED_BLOCKS_PER_SM`` blocks per SM and as much of each row as fits
  is kept in shared memory between the two sweeps, so the second sweep reads (almost) nothing
  from HBM.
* split: few rows of many classes (fewer than ``SPLIT_ROWS_PER_SM`` per SM): several blocks per
  row write partial (max, sum-exp); the last block of each row to finish merges them and runs
  the epilogue (``xent_part_stats_*``), and the gradient is written per part
  (``xent_part_grad_*``). Two launches at most: a handful of rows takes microseconds, so the
  launches and allocations on the host are what is left to save.
* probabilities (``from_logits=False``): ``xent_prob_*``, one block per row.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import cupy
import numpy

from fastxent._options import KernelOptions
from fastxent.gpu._names import kernel_name

# Options of the NVRTC compile (also read by tools/check_cuda.py for its nvcc compile).
COMPILE_OPTIONS = ("--std=c++17",)
SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xent.cu")

VECTOR_BYTES = 16  # the kernels' vector loads
MAX_THREADS = 1024  # the kernels' __launch_bounds__
MIN_THREADS = 32  # whole warps: the block reductions assume them
# Vectors a thread should own before the block grows: the kernels keep four loads in flight.
VECTORS_PER_THREAD = 4
# Forward-only blocks stay small so several share an SM and hide each other's reductions.
FORWARD_MAX_THREADS = 512
# Rows at least this long take the cached fwd_bwd path (shorter ones stay in L2 anyway).
FUSED_CACHE_MIN_ROW_BYTES = 32 * 1024
FUSED_THREADS = 1024
FUSED_BLOCKS_PER_SM = 1
# The CUDA runtime reserves this much shared memory per block on sm_80 and later.
SHARED_RESERVED_PER_BLOCK = 1024
# Split rows when there are fewer rows than this many per SM and each row has enough classes.
SPLIT_ROWS_PER_SM = 1
SPLIT_MIN_CLASSES = 16 * 1024
# Blocks the split path aims for per SM, and the granularity of a part (classes).
SPLIT_BLOCKS_PER_SM = 4
SPLIT_PART_ALIGN = 1024
# Classes are indexed by int inside a row (the scalar loops in 64 bits, which pass it by up to
# a block): 2^31 - 1 classes at most (N * C may be anything).
MAX_CLASSES = 2**31 - 1
# gridDim.y, which indexes rows in the part kernels, stops at 65535: more rows go in chunks.
MAX_GRID_ROWS = 65535

_NULL = numpy.uint64(0)  # a null pointer argument (8 bytes, as every pointer)
_ATTR_MULTIPROCESSOR_COUNT = 16  # cudaDevAttrMultiProcessorCount
_ATTR_MAX_SHARED_PER_SM = 81  # cudaDevAttrMaxSharedMemoryPerMultiprocessor
_ATTR_MAX_SHARED_PER_BLOCK_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin

_STORAGE_NAMES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def storage_name(dtype: Any, storage: Optional[str] = None) -> str:
    """The kernel dtype suffix for an array dtype: float16, bfloat16, float32 or float64.

    ``storage`` overrides it, e.g. "bfloat16" for a uint16 array holding bfloat16 bits (CuPy
    releases without a bfloat16 dtype).
    """
    name = storage if storage is not None else numpy.dtype(dtype).name
    if name not in _STORAGE_NAMES:
        raise TypeError(f"the GPU kernels take float16, bfloat16, float32 or float64 logits; got {name}")
    return _STORAGE_NAMES[name]


def itemsize(storage: str) -> int:
    return 8 if storage == "float64" else 4 if storage == "float32" else 2


def acc_dtype(storage: str):
    """The compute type of a storage type: float64 for float64, float32 otherwise."""
    return numpy.float64 if storage == "float64" else numpy.float32


# ----------------------------------------------------------------------------------------
# Module, kernels and device limits, each looked up once
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    with open(SOURCE_PATH) as handle:
        source = handle.read()
    return cupy.RawModule(code=source, options=COMPILE_OPTIONS)


@functools.lru_cache(maxsize=None)
def _kernel_on(name: str, device_id: int):
    with cupy.cuda.Device(device_id):
        return _module(device_id).get_function(name)


def get_kernel(name: str):
    """The RawKernel of one entry of xent.cu for the current device (a function handle belongs
    to the device its module was loaded on: one module per device, compiled on first use)."""
    return _kernel_on(name, cupy.cuda.runtime.getDevice())


@dataclass(frozen=True)
class DeviceLimits:
    sm_count: int
    max_shared_per_block: int  # opt-in maximum of one block's dynamic + static shared memory
    max_shared_per_sm: int


@functools.lru_cache(maxsize=None)
def device_limits(device_id: int) -> DeviceLimits:
    attribute = cupy.cuda.runtime.deviceGetAttribute
    return DeviceLimits(
        sm_count=attribute(_ATTR_MULTIPROCESSOR_COUNT, device_id),
        max_shared_per_block=attribute(_ATTR_MAX_SHARED_PER_BLOCK_OPTIN, device_id),
        max_shared_per_sm=attribute(_ATTR_MAX_SHARED_PER_SM, device_id),
    )


def current_limits() -> DeviceLimits:
    return device_limits(cupy.cuda.runtime.getDevice())


_dynamic_shared_set = {}
# Per host thread: CuPy's per-thread default stream (CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1) gives
# every thread's current stream the same handle, cudaStreamPerThread, though the streams differ
# and their launches may overlap.
_thread_state = threading.local()


def row_counters(num_rows: int):
    """A zeroed uint32 buffer of at least num_rows for the split path's arrival counts.

    The kernel leaves it zeroed, so one buffer per (host thread, device, stream handle) serves
    every launch without a memset: launches on one thread's stream never overlap.
    """
    buffers = getattr(_thread_state, "row_counters", None)
    if buffers is None:
        buffers = _thread_state.row_counters = {}
    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    counters = buffers.get(key)
    if counters is None or counters.size < num_rows:
        counters = cupy.zeros(max(num_rows, 256), dtype=cupy.uint32)
        buffers[key] = counters
    return counters


def _allow_dynamic_shared(kernel, name: str, num_bytes: int) -> None:
    """Raise the kernel's dynamic shared memory limit (48 KiB by default) once per device."""
    key = (cupy.cuda.runtime.getDevice(), name)
    if _dynamic_shared_set.get(key, 0) < num_bytes:
        kernel.max_dynamic_shared_size_bytes = int(num_bytes)
        _dynamic_shared_set[key] = num_bytes


# ----------------------------------------------------------------------------------------
# Launch geometry
# ----------------------------------------------------------------------------------------


def threads_for(num_vectors: int, cap: int = MAX_THREADS) -> int:
    """A power-of-two block size in [MIN_THREADS, cap] giving each thread about
    VECTORS_PER_THREAD vectors of the range."""
    wanted = max(1, -(-num_vectors // VECTORS_PER_THREAD))
    threads = MIN_THREADS
    while threads < wanted and threads < cap:
        threads *= 2
    return min(threads, cap)


def use_split_rows(num_rows: int, num_classes: int, limits: DeviceLimits) -> bool:
    """Whether few long rows should be cut into parts so that every SM has work."""
    return num_rows < SPLIT_ROWS_PER_SM * limits.sm_count and num_classes >= SPLIT_MIN_CLASSES


def split_part_length(num_rows: int, num_classes: int, limits: DeviceLimits) -> int:
    """Classes per part: about SPLIT_BLOCKS_PER_SM blocks per SM, whole SPLIT_PART_ALIGN units."""
    wanted_parts = max(1, -(-SPLIT_BLOCKS_PER_SM * limits.sm_count // max(num_rows, 1)))
    part_len = -(-num_classes // wanted_parts)
    return max(SPLIT_PART_ALIGN, -(-part_len // SPLIT_PART_ALIGN) * SPLIT_PART_ALIGN)


@dataclass(frozen=True)
class RowsPlan:
    grid: int
    threads: int
    cache_vectors: int  # 16-byte vectors of each row kept in shared memory (fwd_bwd)

    @property
    def shared_bytes(self) -> int:
        return self.cache_vectors * VECTOR_BYTES


def plan_rows(
    num_rows: int, num_classes: int, itemsize: int, want_grad: bool, limits: DeviceLimits, static_shared_bytes: int = 0
) -> RowsPlan:
    """Grid, block size and shared-memory row cache of the one-block-per-row kernels."""
    num_vectors = num_classes * itemsize // VECTOR_BYTES
    if want_grad and num_classes * itemsize >= FUSED_CACHE_MIN_ROW_BYTES:
        # Cap the rows in flight and keep the start of each row in shared memory: the second
        # sweep then reads only the rest, which is still in L2.
        per_block = min(
            limits.max_shared_per_block, limits.max_shared_per_sm // FUSED_BLOCKS_PER_SM - SHARED_RESERVED_PER_BLOCK
        )
        budget = max(0, per_block - static_shared_bytes)
        cache_vectors = min(num_vectors, budget // VECTOR_BYTES)
        grid = min(num_rows, limits.sm_count * FUSED_BLOCKS_PER_SM)
        return RowsPlan(grid=grid, threads=FUSED_THREADS, cache_vectors=cache_vectors)
    cap = MAX_THREADS if want_grad else FORWARD_MAX_THREADS
    return RowsPlan(grid=min(num_rows, 2**31 - 1), threads=threads_for(num_vectors, cap), cache_vectors=0)


# ----------------------------------------------------------------------------------------
# Typed launchers: one per kernel signature in xent.cu, every scalar converted explicitly
# ----------------------------------------------------------------------------------------


def _pointer(array):
    return _NULL if array is None else array


def launch_logit_rows(
    kernel,
    plan: RowsPlan,
    logits,
    grad,
    labels,
    sample_weight,
    class_weight,
    class_weight_elem,
    options: KernelOptions,
    loss,
) -> None:
    """xent_fwd_* / xent_fwd_bwd_*: loss (N,) float64 and, with ``grad``, the gradient."""
    num_rows, num_classes = logits.shape
    kernel(
        (plan.grid,),
        (plan.threads,),
        (
            logits,
            _pointer(grad),
            labels,
            sample_weight,
            _pointer(class_weight),
            _pointer(class_weight_elem),
            numpy.float64(options.class_weight_total),
            numpy.int64(num_rows),
            numpy.int64(num_classes),
            numpy.float64(options.num_classes),
            numpy.float64(options.label_smoothing),
            numpy.float64(options.z_loss),
            numpy.float64(options.softcap or 0.0),
            numpy.float64(options.grad_scale),
            numpy.int64(plan.cache_vectors),
            loss,
        ),
        shared_mem=plan.shared_bytes,
    )


def launch_part_stats(
    kernel,
    num_parts: int,
    threads: int,
    logits,
    labels,
    sample_weight,
    class_weight,
    class_weight_elem,
    part_len: int,
    options: KernelOptions,
    part_stats,
    row_counters,
    loss,
    row_coefs,
    range_stats=None,
) -> None:
    """xent_part_stats_*: partial statistics of every (row, part) into part_stats (3, N, P)
    float64, merged per row into loss (N,) and, unless None, row_coefs (N, 4) float64.
    row_counters: uint32 (>= N,), zero, and zero again afterwards.

    Class-range mode: with ``range_stats`` (5, N) float64, the merged statistics of each row
    (row_max, sum_exp, weighted_sum, target value, target input) go there instead of an
    epilogue; labels are local to the range (-1 ignored, -2 elsewhere), loss and row_coefs None.
    """
    num_rows, num_classes = logits.shape
    kernel(
        (num_parts, num_rows),
        (threads,),
        (
            logits,
            labels,
            _pointer(sample_weight),
            _pointer(class_weight),
            _pointer(class_weight_elem),
            numpy.float64(options.class_weight_total),
            numpy.int64(num_classes),
            numpy.int64(part_len),
            numpy.float64(options.num_classes),
            numpy.float64(options.label_smoothing),
            numpy.float64(options.z_loss),
            numpy.float64(options.softcap or 0.0),
            numpy.float64(options.grad_scale),
            part_stats,
            row_counters,
            _pointer(loss),
            _pointer(row_coefs),
            _pointer(range_stats),
        ),
    )


def launch_part_grad(
    kernel,
    num_parts: int,
    threads: int,
    logits,
    grad,
    labels,
    class_weight_elem,
    row_coefs,
    part_len: int,
    options: KernelOptions,
) -> None:
    """xent_part_grad_*: the gradient of every (row, part) from the merged coefficients."""
    num_rows, num_classes = logits.shape
    kernel(
        (num_parts, num_rows),
        (threads,),
        (
            logits,
            grad,
            labels,
            _pointer(class_weight_elem),
            row_coefs,
            numpy.int64(num_classes),
            numpy.int64(part_len),
            numpy.float64(options.softcap or 0.0),
        ),
    )


def launch_prob_rows(
    kernel,
    grid: int,
    threads: int,
    probs,
    grad,
    labels,
    sample_weight,
    class_weight,
    class_weight_elem,
    options: KernelOptions,
    loss,
    row_min,
) -> None:
    """xent_prob_*: loss, row minima and (with ``grad``) the gradient for probability inputs."""
    num_rows, num_classes = probs.shape
    kernel(
        (grid,),
        (threads,),
        (
            probs,
            _pointer(grad),
            labels,
            sample_weight,
            _pointer(class_weight),
            _pointer(class_weight_elem),
            numpy.float64(options.class_weight_total),
            numpy.int64(num_rows),
            numpy.int64(num_classes),
            numpy.float64(options.num_classes),
            numpy.float64(options.label_smoothing),
            numpy.float64(options.z_loss),
            numpy.float64(options.grad_scale),
            loss,
            row_min,
        ),
    )


# ----------------------------------------------------------------------------------------
# The launcher the public API calls
# ----------------------------------------------------------------------------------------


def empty_rows_like(rows):
    """An uninitialised array like ``rows`` whose start has the same offset modulo 16 bytes.

    The kernels' vector path needs the logits and gradient rows equally aligned; a fresh
    allocation is 256-byte aligned, but ``rows`` may be a view that starts anywhere.
    """
    misalign = rows.data.ptr % VECTOR_BYTES
    if misalign == 0:
        return cupy.empty(rows.shape, dtype=rows.dtype)
    offset = misalign // rows.dtype.itemsize
    flat = cupy.empty(rows.size + VECTOR_BYTES // rows.dtype.itemsize, dtype=rows.dtype)
    return flat[offset : offset + rows.size].reshape(rows.shape)


def fused_xent(
    logits,
    labels,
    sample_weight,
    options: KernelOptions,
    *,
    want_grad: bool,
    inplace: bool = False,
    storage: Optional[str] = None,
    grad_out: Optional[Any] = None,
) -> Tuple[Any, Optional[Any], Optional[Any]]:
    """Per-row loss and, if asked, the gradient of logits (N, C) in one fused call, on the GPU.

    Args:
        logits: C-contiguous (N, C) CuPy array, float16/bfloat16/float32/float64 (or uint16
            holding bfloat16 bits, with ``storage="bfloat16"``).
        labels: int64 (N,), -1 for ignored rows, otherwise in [0, C).
        sample_weight: float64 (N,).
        options: validated options; ``options.grad_scale`` is the reduction's factor.
        want_grad: also compute d(loss)/d(logits).
        inplace: write the gradient over ``logits`` (only with ``want_grad``).
        storage: kernel dtype name overriding ``logits.dtype`` (see ``storage_name``).
        grad_out: C-contiguous (N, C) CuPy buffer like ``logits`` to receive the gradient
            instead of a new array (only with ``want_grad``, not with ``inplace``).

    Returns:
        (loss float64 (N,), gradient (N, C) in the logits' dtype or None, row minimum float64
        (N,) for probability inputs or None), all CuPy arrays on the logits' device.
    """
    # Limits, counters, kernels and launches on the logits' device, whichever is current.
    with logits.device:
        return _fused_xent(logits, labels, sample_weight, options, want_grad, inplace, storage, grad_out)


def class_weight_arrays(options: KernelOptions, dtype_name: str):
    """(float64 (C,), compute-type (C,) or None) class weights as the kernels index them:
    C-contiguous (a strided view would be read as if it were contiguous). The compute-type copy
    only where label smoothing reads a weight per class; otherwise the target's weight alone
    matters, read from the float64 array. (None, None) without class weights."""
    if options.class_weight is None:
        return None, None
    class_weight = contiguous(cupy.asarray(options.class_weight), numpy.float64)
    class_weight_elem = None
    if options.label_smoothing != 0.0:
        class_weight_elem = contiguous(class_weight, acc_dtype(dtype_name))
    return class_weight, class_weight_elem


def _fused_xent(logits, labels, sample_weight, options, want_grad, inplace, storage, grad_out):
    dtype_name = storage_name(logits.dtype, storage)
    num_rows, num_classes = logits.shape
    if num_classes > MAX_CLASSES:
        raise ValueError(f"the GPU kernels index classes with 32-bit integers: C = {num_classes} is too large")
    labels = contiguous(labels, numpy.int64)
    sample_weight = contiguous(sample_weight, numpy.float64)
    loss = cupy.empty(num_rows, dtype=cupy.float64)

    if not options.from_logits:
        return _prob_rows(logits, labels, sample_weight, options, dtype_name, want_grad, loss, grad_out)
    grad = None
    if want_grad:
        grad = logits if inplace else (empty_rows_like(logits) if grad_out is None else grad_out)
    if num_rows == 0:
        return loss, grad, None

    class_weight, class_weight_elem = class_weight_arrays(options, dtype_name)
    softcap = options.softcap is not None
    limits = current_limits()
    if use_split_rows(num_rows, num_classes, limits):
        part_len = split_part_length(num_rows, num_classes, limits)
        num_parts = -(-num_classes // part_len)
        if num_parts >= 2:
            _split_rows(
                logits,
                grad,
                labels,
                sample_weight,
                class_weight,
                class_weight_elem,
                options,
                dtype_name,
                softcap,
                part_len,
                num_parts,
                loss,
            )
            return loss, grad, None

    name = kernel_name("fwd_bwd" if want_grad else "fwd", dtype_name, softcap)
    kernel = get_kernel(name)
    static_shared = kernel.shared_size_bytes if want_grad else 0
    plan = plan_rows(num_rows, num_classes, itemsize(dtype_name), want_grad, limits, static_shared)
    if plan.shared_bytes > 0:
        _allow_dynamic_shared(kernel, name, plan.shared_bytes)
    launch_logit_rows(kernel, plan, logits, grad, labels, sample_weight, class_weight, class_weight_elem, options, loss)
    return loss, grad, None


def contiguous(array, dtype):
    """``array`` itself when it already is C-contiguous of ``dtype`` (the usual case: the
    checks cost less than the CuPy call they avoid), otherwise a converted copy."""
    if array.dtype == dtype and array.flags.c_contiguous:
        return array
    return cupy.ascontiguousarray(array, dtype=dtype)


def _split_rows(
    logits,
    grad,
    labels,
    sample_weight,
    class_weight,
    class_weight_elem,
    options,
    dtype_name,
    softcap,
    part_len,
    num_parts,
    loss,
) -> None:
    """Few rows, many classes: statistics per (row, part) merged exactly by each row's last
    block, then the gradient per part. gridDim.y counts rows: launches of MAX_GRID_ROWS rows
    at most, in order on the stream (they share the partials buffer and the counters)."""
    num_rows = logits.shape[0]
    chunk_rows = min(num_rows, MAX_GRID_ROWS)
    threads = threads_for(part_len * itemsize(dtype_name) // VECTOR_BYTES)
    part_stats = cupy.empty(3 * chunk_rows * num_parts, dtype=cupy.float64)
    row_coefs = None if grad is None else cupy.empty((num_rows, 4), dtype=cupy.float64)
    counters = row_counters(chunk_rows)
    stats_kernel = get_kernel(kernel_name("part_stats", dtype_name, softcap))
    grad_kernel = None if grad is None else get_kernel(kernel_name("part_grad", dtype_name, softcap))
    for lo in range(0, num_rows, chunk_rows):
        rows = slice(lo, min(lo + chunk_rows, num_rows))
        coefs = None if row_coefs is None else row_coefs[rows]
        launch_part_stats(
            stats_kernel,
            num_parts,
            threads,
            logits[rows],
            labels[rows],
            sample_weight[rows],
            class_weight,
            class_weight_elem,
            part_len,
            options,
            part_stats,
            counters,
            loss[rows],
            coefs,
        )
        if grad is not None:
            launch_part_grad(
                grad_kernel,
                num_parts,
                threads,
                logits[rows],
                grad[rows],
                labels[rows],
                class_weight_elem,
                coefs,
                part_len,
                options,
            )


def _prob_rows(probs, labels, sample_weight, options, dtype_name, want_grad, loss, grad_out=None):
    """Probability inputs, computed in the compute type like logits. An in-place request still
    writes a new buffer, so the input is intact if the caller's check of the row minima rejects
    it (as on the CPU)."""
    num_rows, num_classes = probs.shape
    row_min = cupy.empty(num_rows, dtype=cupy.float64)
    grad = (empty_rows_like(probs) if grad_out is None else grad_out) if want_grad else None
    if num_rows == 0:
        return loss, grad, row_min
    class_weight, class_weight_elem = class_weight_arrays(options, dtype_name)
    threads = threads_for(num_classes * itemsize(dtype_name) // VECTOR_BYTES, FORWARD_MAX_THREADS)
    launch_prob_rows(
        get_kernel(kernel_name("prob", dtype_name)),
        min(num_rows, 2**31 - 1),
        threads,
        probs,
        grad,
        labels,
        sample_weight,
        class_weight,
        class_weight_elem,
        options,
        loss,
        row_min,
    )
    return loss, grad, row_min


# ----------------------------------------------------------------------------------------
# A kept gradient times a device scalar
# ----------------------------------------------------------------------------------------

# Blocks of the scaling launch: enough to fill any GPU, few enough that a skipped launch (a
# factor of 1) costs next to nothing; the kernel strides over the rest.
SCALE_THREADS = 256
SCALE_MAX_BLOCKS = 4096


def scale_unless_one(grad: Any, factor: Any, storage: str) -> None:
    """``grad *= factor`` in place on CuPy's current stream, unless the device scalar ``factor``
    is exactly 1: the kernel reads it and returns, so the host never waits to look at it.

    Args:
        grad: C-contiguous CuPy array of any shape, stored as ``storage`` (float16, bfloat16 as
            its uint16 bits or CuPy's bfloat16, float32, float64).
        factor: a one-element CuPy array of the same storage on the same device.
        storage: the storage name.
    """
    count = int(grad.size)
    if count == 0:
        return
    blocks = min(-(-count // SCALE_THREADS), SCALE_MAX_BLOCKS)
    kernel = get_kernel(kernel_name("scale", storage))
    kernel((blocks,), (SCALE_THREADS,), (grad, factor, numpy.int64(count)))
