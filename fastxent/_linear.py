"""Linear + cross-entropy without the logits: the backend-neutral orchestration.

The logits of an LM head are ``hidden @ weight.T + bias``, (N, V); with N = 1e5 rows and
V = 2.6e5 classes they would take 100 GB in float32. This module never holds more than one
block of them. It belongs to no backend: a backend provides its GEMMs (``LinearOps``) and its
row kernels (the range layer's ``RangeKernel`` and its fused launcher), and everything here is
loops over blocks, the range layer's merge and epilogue, and O(N) host numbers.

Two schedules, chosen by whether gradients are wanted:

1. Loss only (``loss_rows``): blocks of (rows, classes) small enough to stay in cache. Each is
   one GEMM; the range kernel reads the block back while it is still cached and returns its
   partial statistics (row max, sum of exps, target logit, weighted sum), which merge exactly
   into the running statistics. One GEMM's work in all, extra memory one block + O(N).

2. With gradients (``loss_and_grads``): chunks of rows over the whole vocabulary, each
   computed once: logits of the chunk (one GEMM), the core's fused row kernel turns them into
   loss and gradient in place (each row's statistics and gradient while the row is in L2),
   then dX_chunk = G W (K = V) and dW += G^T X_chunk (BLAS accumulates in place; K = the chunk's
   rows). Three GEMMs' work, nothing recomputed; extra memory one chunk + O(N).

   Why not blocks of classes for the gradients: the gradient of a class block needs the
   log-sum-exp over the whole vocabulary first, so a pass over statistics and a second
   pass over recomputed logits would cost a fourth GEMM (4/3 of the minimum). Chunks of rows
   keep each row's whole vocabulary together instead; their one cost is the K of the dW GEMM,
   which stays at full speed from about 256 rows (measured with OpenBLAS), where it blocks K
   itself.

Both schedules can share the work among threads (``LinearBlocks.workers``): each worker runs
its own GEMMs on its own thread, then the row kernel on the same blocks while they are in its
cache. On the CPU this beats handing each step to a multi-threaded GEMM and then to a parallel
kernel: BLAS's worker threads spin for a while after each GEMM and compete with the kernel's,
and every hand-over moves the block to other cores' caches.

Block shapes and the worker count come from the memory budget and the problem size
(``plan_blocks``) unless given.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np

from fastxent._options import KernelOptions
from fastxent._range import (
    RangeKernel,
    RowStats,
    finish_rows,
    local_labels,
    merge_stats,
    target_weights,
)

# The loss-only pass: bytes of one block of logits, so it stays in the last-level cache
# between the GEMM that writes it and the kernel that reads it.
CACHE_BLOCK_BYTES = 8 << 20
# Rows of a block in the loss-only pass (and at most this many rows per GEMM there).
FORWARD_ROWS = 2048
# The gradient pass's chunk: at most this many bytes, and at most an eighth of the whole
# logits (the point of the fused op is to be far from storing them).
DEFAULT_MEMORY_BUDGET = 256 << 20
LOGITS_FRACTION = 8
# Row counts are rounded down to a multiple of this (GEMM micro-kernels work in such tiles).
ROW_ALIGN = 16
CLASS_ALIGN = 256
# Problems below this many multiply-adds (N x V x H, about 10 ms of GEMM) run on the calling
# thread: starting worker threads and meeting at barriers would cost more than they share.
PARALLEL_MIN_WORK = 1 << 30


@dataclass(frozen=True)
class LinearBlocks:
    """Block shapes of one call.

    Attributes:
        rows: rows per block of the loss-only pass.
        classes: classes per block of the loss-only pass.
        grad_rows: rows per chunk of the gradient pass (each chunk spans the whole vocabulary).
        workers: threads that share the work (1: the calling thread, with the backend's own
            parallel GEMMs).
    """

    rows: int
    classes: int
    grad_rows: int
    workers: int = 1


def _round_down(value: int, align: int) -> int:
    return value - value % align if value >= align else max(1, value)


def plan_blocks(
    num_rows: int,
    num_classes: int,
    itemsize: int,
    *,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    features: int = 1,
    max_workers: int = 1,
    workers: Optional[int] = None,
) -> LinearBlocks:
    """Block shapes from the problem size and a memory budget (bytes of logits held at once).

    Without a budget: the smaller of ``DEFAULT_MEMORY_BUDGET`` and an eighth of the N x V
    logits. ``block_rows`` overrides the rows of both passes, ``block_classes`` the classes of
    the loss-only pass. ``workers`` overrides the thread count, which is otherwise
    ``max_workers`` (the backend's) for problems of at least ``PARALLEL_MIN_WORK``
    multiply-adds (N x V x ``features``) and 1 below.
    """
    num_rows, num_classes = max(1, num_rows), max(1, num_classes)
    logits_bytes = num_rows * num_classes * itemsize
    if memory_budget is None:
        memory_budget = min(DEFAULT_MEMORY_BUDGET, logits_bytes // LOGITS_FRACTION)
    if workers is None:
        workers = max_workers if num_rows * num_classes * features >= PARALLEL_MIN_WORK else 1
    workers = max(1, workers)
    # Each worker holds its own block in the loss-only pass.
    cache_bytes = min(CACHE_BLOCK_BYTES, max(memory_budget // workers, 1))

    rows = min(num_rows, FORWARD_ROWS)
    classes = _round_down(cache_bytes // (rows * itemsize), CLASS_ALIGN)
    if classes < CLASS_ALIGN and num_classes >= CLASS_ALIGN:
        # A narrow budget: keep the class blocks GEMM-sized and give up rows instead.
        classes = CLASS_ALIGN
        rows = _round_down(max(1, cache_bytes // (classes * itemsize)), ROW_ALIGN)
    # The gradient pass holds one chunk of logits, and workers 1.. a (chunk, H) partial dX each.
    grad_rows = _round_down(max(1, memory_budget // ((num_classes + (workers - 1) * features) * itemsize)), ROW_ALIGN)

    if block_rows is not None:
        rows = grad_rows = block_rows
    if block_classes is not None:
        classes = block_classes
    return LinearBlocks(min(rows, num_rows), min(classes, num_classes), min(grad_rows, num_rows), workers)


class LinearOps(Protocol):
    """The GEMMs a backend provides, on arrays of its own type in the compute dtype.

    Output buffers may be column slices of a larger row-major buffer (rows contiguous, a
    leading dimension wider than the slice): the parallel gradient pass gives each worker the
    columns of its own classes.
    """

    def empty(self, shape: Tuple[int, ...]) -> Any:
        """An uninitialised buffer in the compute dtype."""

    def row_losses(self, num_rows: int) -> Any:
        """Zeroed float64 (num_rows,) per-row losses in the backend's array type (a GPU keeps
        them on the device, so a call reads nothing back per block)."""

    def logits(self, hidden: Any, weight: Any, bias: Optional[Any], out: Any) -> Any:
        """out (n, v) = hidden (n, H) @ weight (v, H)^T [+ bias (v,)]; returns out."""

    def hidden_grad(self, grad: Any, weight: Any, out: Any) -> None:
        """out (n, H) = grad (n, V) @ weight (V, H)."""

    def accumulate_weight_grad(self, grad: Any, hidden: Any, out: Any) -> None:
        """out (V, H) += grad (n, V)^T @ hidden (n, H)."""

    def accumulate_bias_grad(self, grad: Any, out: Any) -> None:
        """out (V,) float64 += the column sums of grad (n, V)."""

    def worker_scope(self) -> ContextManager[Any]:
        """Entered by each worker thread while ``blocks.workers`` > 1: the backend's per-thread
        setup (the workers are the parallelism, so each runs its kernels on its own thread)."""


class Grads(NamedTuple):
    """Gradient buffers to fill (None where not wanted), in the compute dtype (bias: float64)."""

    hidden: Optional[Any]
    weight: Optional[Any]
    bias: Optional[Any]


FusedRows = Callable[..., Tuple[Any, Any, Any]]


def _block_view(buffer: Any, num_rows: int, num_classes: int) -> Any:
    """A C-contiguous (rows, classes) view of the front of a flat buffer (GEMMs and kernels
    both want contiguous rows, also for the last, narrower block)."""
    return buffer[: num_rows * num_classes].reshape(num_rows, num_classes)


def _split(length: int, parts: int, index: int) -> Tuple[int, int]:
    """The index-th of ``parts`` near-equal contiguous ranges of [0, length)."""
    return length * index // parts, length * (index + 1) // parts


def run_workers(
    count: int, scope: Callable[[], ContextManager[Any]], work: Callable[[int, threading.Barrier], None]
) -> None:
    """``work(index, barrier)`` for index in [0, count), each on its own thread (index 0 on the
    calling thread), all sharing one barrier; returns when all are done.

    With ``count`` = 1 the work runs on the calling thread without ``scope``. The first
    exception a worker raises breaks the barrier, so no other worker waits for it forever, and
    is raised here once every worker has stopped.
    """
    barrier = threading.Barrier(count)
    if count == 1:
        work(0, barrier)
        return
    errors: List[Optional[BaseException]] = [None] * count

    def body(index: int) -> None:
        try:
            with scope():
                work(index, barrier)
        except BaseException as error:  # noqa: B036 - re-raised on the calling thread below
            errors[index] = error
            barrier.abort()

    threads = [
        threading.Thread(target=body, args=(i,), name=f"fastxent-linear-{i}", daemon=True) for i in range(1, count)
    ]
    for thread in threads:
        thread.start()
    try:
        body(0)
    finally:
        for thread in threads:
            thread.join()
    # The original failure, not the BrokenBarrierError it caused in the others.
    failures = [e for e in errors if e is not None]
    original = [e for e in failures if not isinstance(e, threading.BrokenBarrierError)]
    if failures:
        raise (original or failures)[0]


def block_stats(
    ops: LinearOps,
    hidden: Any,
    weight: Any,
    bias: Optional[Any],
    blocks: LinearBlocks,
    range_stats: Callable[[Any, int, int, int, int], Any],
    merge: Callable[[Sequence[Any]], Any],
) -> Dict[int, Any]:
    """Statistics of every row over the whole vocabulary from blocks of logits (schedule 1 of
    the module docstring), by row block: {first row of the block: its rows' statistics}.

    ``range_stats(block, row_lo, row_hi, lo, hi)`` gives the statistics of the logits of rows
    [row_lo, row_hi) and classes [lo, hi) (``block``, C-contiguous); ``merge`` merges those of
    disjoint class ranges of the same rows, exactly and in any order.

    With several workers, each takes the next (rows, classes) block from a shared queue, so a
    slower thread takes fewer; each merges its blocks' statistics per row block, and the
    workers' statistics are merged at the end.
    """
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    row_starts = range(0, num_rows, blocks.rows)
    items = [(row_lo, lo) for row_lo in row_starts for lo in range(0, num_classes, blocks.classes)]
    queue = iter(range(len(items)))
    queue_lock = threading.Lock()
    per_worker: List[Dict[int, Any]] = [{} for _ in range(blocks.workers)]

    def work(index: int, _barrier: threading.Barrier) -> None:
        buffer = ops.empty((blocks.rows * blocks.classes,))
        merged = per_worker[index]
        while True:
            with queue_lock:
                item = next(queue, None)
            if item is None:
                return
            row_lo, lo = items[item]
            row_hi, hi = min(row_lo + blocks.rows, num_rows), min(lo + blocks.classes, num_classes)
            # 1. One block of logits, written by the GEMM ...
            block = ops.logits(
                hidden[row_lo:row_hi],
                weight[lo:hi],
                None if bias is None else bias[lo:hi],
                _block_view(buffer, row_hi - row_lo, hi - lo),
            )
            # 2. ... read back by the range kernel while it is cached, merged into the rows' statistics.
            part = range_stats(block, row_lo, row_hi, lo, hi)
            merged[row_lo] = part if row_lo not in merged else merge([merged[row_lo], part])

    if num_rows:
        run_workers(blocks.workers, ops.worker_scope, work)
    return {row_lo: merge([merged[row_lo] for merged in per_worker if row_lo in merged]) for row_lo in row_starts}


def loss_rows(
    ops: LinearOps,
    kernel: RangeKernel,
    hidden: Any,
    weight: Any,
    bias: Optional[Any],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    blocks: LinearBlocks,
) -> np.ndarray:
    """Per-row losses float64 (N,) from class-block statistics (schedule 1 of the module docstring).

    hidden (N, H), weight (V, H), bias (V,) or None in the compute dtype; labels int64 (N,)
    over the whole vocabulary, -1 for ignored rows; sample_weight float64 (N,).
    """
    num_rows = hidden.shape[0]
    loss = ops.row_losses(num_rows)
    class_weight = options.class_weight

    def range_stats(block: Any, row_lo: int, row_hi: int, lo: int, hi: int) -> RowStats:
        block_options = options if class_weight is None else replace(options, class_weight=class_weight[lo:hi])
        return kernel.stats(block, local_labels(labels[row_lo:row_hi], lo, hi - lo), block_options)

    for row_lo, stats in block_stats(ops, hidden, weight, bias, blocks, range_stats, merge_stats).items():
        row_hi = min(row_lo + blocks.rows, num_rows)
        rows_labels = labels[row_lo:row_hi]
        # 3. The float64 epilogue over the whole vocabulary.
        weights = target_weights(rows_labels, class_weight)
        coefs = finish_rows(stats, rows_labels, weights, sample_weight[row_lo:row_hi], options)
        loss[row_lo:row_hi] = coefs.loss
    return loss


def loss_and_grads(
    ops: LinearOps,
    fused_rows: FusedRows,
    hidden: Any,
    weight: Any,
    bias: Optional[Any],
    labels: np.ndarray,
    sample_weight: np.ndarray,
    options: KernelOptions,
    blocks: LinearBlocks,
    grads: Grads,
) -> Any:
    """Per-row losses float64 (N,) (``ops.row_losses``), filling ``grads`` (schedule 2 of the
    module docstring).

    ``fused_rows`` is the backend's fused launcher (``fused_xent``: rows, labels, sample
    weights, options; ``want_grad``, ``inplace``) applied to whole rows of a chunk; labels and
    sample weights are sliced by rows only, so they may be the backend's arrays. Another row
    kernel may stand in for it (the per-token statistics' gradient): ``sample_weight`` may then
    be any per-row values, (N,) or (N, k), which it receives sliced with the rows.
    ``grads.weight`` and ``grads.bias`` must start at zero; ``grads.hidden`` is written. With
    no gradient wanted the row kernel computes the loss alone (a GPU's loss-only schedule:
    chunks of whole rows, no statistics to merge).

    With T workers, each chunk goes through three phases separated by barriers. Worker t owns
    the t-th part of the classes for the GEMMs and the t-th part of the chunk's rows for the
    row kernel:

    1. logits[:, classes_t] = X_chunk W_t^T (every row, its classes: W is read once per chunk);
    2. loss and gradient of rows_t in place (whole rows: every worker's classes are written);
       also the previous chunk's dX partial sums, rows_t of them;
    3. dX partial_t = G[:, classes_t] W_t, dW_t += G[:, classes_t]^T X_chunk, db_t likewise:
       no two workers write the same gradient entries, so nothing is locked.

    The dX partials of workers 1.. sit in (chunk, H) buffers until phase 2 of the next chunk
    (or the end) adds them into worker 0's, which was written into dX directly.
    """
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    loss = ops.row_losses(num_rows)
    if num_rows == 0:
        return loss
    count = blocks.workers
    step = blocks.grad_rows
    want_grad = any(g is not None for g in grads)
    buffer = ops.empty((step, num_classes))
    partials = [ops.empty((step, hidden.shape[1])) for _ in range(count - 1)] if grads.hidden is not None else []

    def add_partials(chunk_lo: int, chunk_rows: int, index: int) -> None:
        """Rows ``index`` of the chunk's dX: worker 0's (already in place) plus the others'."""
        r_lo, r_hi = _split(chunk_rows, count, index)
        for partial in partials:
            grads.hidden[chunk_lo + r_lo : chunk_lo + r_hi] += partial[r_lo:r_hi]

    def work(index: int, barrier: threading.Barrier) -> None:
        v_lo, v_hi = _split(num_classes, count, index)
        weight_part = weight[v_lo:v_hi]
        bias_part = None if bias is None else bias[v_lo:v_hi]
        pending: Optional[Tuple[int, int]] = None
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            chunk = buffer[: hi - lo]
            columns = chunk[:, v_lo:v_hi]
            chunk_hidden = hidden[lo:hi]
            # 1. This worker's classes of the chunk's logits (one GEMM over all its rows).
            if v_hi > v_lo:
                ops.logits(chunk_hidden, weight_part, bias_part, columns)
            barrier.wait()
            # 2. Loss and d(loss)/d(logits) in place for this worker's whole rows: each row swept
            #    for its statistics, then for its gradient while it is still in L2.
            if pending is not None:
                add_partials(*pending, index)
            r_lo, r_hi = _split(hi - lo, count, index)
            if r_hi > r_lo:
                rows_loss, _, _ = fused_rows(
                    chunk[r_lo:r_hi],
                    labels[lo + r_lo : lo + r_hi],
                    sample_weight[lo + r_lo : lo + r_hi],
                    options,
                    want_grad=want_grad,
                    inplace=want_grad,
                )
                loss[lo + r_lo : lo + r_hi] = rows_loss
            barrier.wait()
            # 3. Back through the linear layer, this worker's classes: dX partial, dW and db rows.
            if grads.hidden is not None:
                target = grads.hidden[lo:hi] if index == 0 else partials[index - 1][: hi - lo]
                if v_hi > v_lo:
                    ops.hidden_grad(columns, weight_part, target)
                else:
                    target[...] = 0
                pending = (lo, hi - lo)
            if v_hi > v_lo:
                if grads.weight is not None:
                    ops.accumulate_weight_grad(columns, chunk_hidden, grads.weight[v_lo:v_hi])
                if grads.bias is not None:
                    ops.accumulate_bias_grad(columns, grads.bias[v_lo:v_hi])
        if pending is not None and partials:
            barrier.wait()
            add_partials(*pending, index)

    run_workers(count, ops.worker_scope, work)
    return loss
