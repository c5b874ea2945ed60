"""Vocabulary-parallel linear + cross-entropy: each rank holds a slice of the output layer's rows.

Rank r holds ``weight[vocab_start : vocab_start + V_r]`` (and that slice of the bias and class
weights); the hidden states, labels and sample weights are the same on every rank. Per chunk of
rows, each rank computes its own (chunk, V_r) logits with one GEMM and hands them to the sharded
cross-entropy (``fastxent.distributed._sharded.sharded_forward``): the same two all-reductions
of per-row statistics as on materialised logits, then the gradient of its slice, in place. From
that gradient the rank adds its share to the hidden gradient (G_r W_r) and its own weight and
bias gradients (G_r^T X, column sums of G_r). The logits never leave the rank and never exceed
one chunk; the hidden gradient is all-reduced once at the end; the weight gradient stays with
its shard.

The chunks run with the reduction "sum": the reduction's factor (1 / the global count or
weight) is known only after the last chunk, and every gradient is linear in it, so it scales the
summed gradients once at the end.

Every rank must take part in the same collectives, so the chunk size is agreed first: one
all-reduction (MAX) of two numbers that also carries any argument error a rank found alone, so
every rank raises together. Data errors (a bad label, ranks passing different labels) are
decided inside ``sharded_forward`` as for materialised logits.

A failure of this rank's own work (a GEMM, the gradient, out of memory) must not leave the
others waiting in a collective: it is caught, the rank stops computing but goes on joining the
collectives, and the next one carries the failure (the next chunk's statistics, or the hidden
gradient's all-reduction, or a last status all-reduction when no hidden gradient is wanted), after
which every rank raises.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from fastxent import _checks as checks
from fastxent import _linear
from fastxent._range import IGNORED
from fastxent.distributed._comm import Communicator
from fastxent.distributed._sharded import Settings, Shard, error_status, raise_agreed_error, sharded_forward

# Slots of the agreement all-reduction (MAX).
_NEG_ROWS = 0  # minus this rank's chunk rows: the MAX gives minus the smallest
_ERROR_RANK = 1  # 1 + the highest rank whose arguments were rejected, 0 if none


def check_layer(hidden: Any, weight: Any, bias: Any) -> None:
    """This rank's layer: hidden (..., H), weight shard (V_r, H), bias (V_r,), one float dtype."""
    if hidden.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64; got dtype {hidden.dtype}")
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have at least one dimension (the features); got shape {hidden.shape}")
    if weight.ndim != 2:
        raise ValueError(f"weight_shard must be 2-D (V_local, H) as nn.Linear's; got shape {weight.shape}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight_shard dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight_shard shape {weight.shape} does not match hidden shape {hidden.shape}: "
            f"it must be (V_local, {hidden.shape[-1]})"
        )
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), one entry per local class; got {bias.shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")


def _agree_on_chunks(comm: Communicator, rows: int, error: Optional[Exception]) -> int:
    """The smallest chunk any rank asked for; raises on every rank if any rank found an error."""
    buffer = np.zeros(2)
    buffer[_NEG_ROWS] = -float(rows)
    buffer[_ERROR_RANK] = error_status(comm, error)
    comm.allreduce_max(buffer)
    raise_agreed_error(comm, float(buffer[_ERROR_RANK]), error, "before the first chunk")
    return max(1, int(-buffer[_NEG_ROWS]))


def _agree_on_status(comm: Communicator, failure: Optional[BaseException]) -> None:
    """One all-reduction of a status only: every rank raises if any rank failed since its last
    collective."""
    buffer = np.array([error_status(comm, failure)])
    comm.allreduce_max(buffer)
    raise_agreed_error(comm, float(buffer[0]), failure, "after the last chunk's statistics")


def _raise_with_position(error: ValueError, comm: Communicator, labels: np.ndarray, settings: Settings):
    """Re-raise ``error``; a bad label found in a chunk gets its position in the whole labels
    (the chunk's own message counts from the chunk's first row). Every rank raises this
    together: the labels are the same on every rank, and so is the first bad one."""
    layout = getattr(comm, "verified_layout", None)
    if "outside the valid range" not in str(error) or layout is None:
        raise error
    valid = None if settings.ignore_index is None else labels != settings.ignore_index
    bad = checks.find_bad_label(labels, valid, layout.num_classes, np)
    if bad is None:
        raise error
    message = checks.bad_label_message(
        *bad, layout.num_classes, settings.ignore_index, of=" of the whole (sharded) vocabulary"
    )
    raise ValueError(message) from None


def sum_with_failures(comm: Communicator, buffer: Any, failure: Optional[BaseException], stage: str, xp: Any = np):
    """Sum ``buffer`` over the group in place, its last value counting the ranks that failed
    (a failed rank sends zeros and 1), and raise on every rank if any did: this rank's own
    error, else one that names how many failed ``stage``. A device buffer is reduced on the
    device where the engine can (one read of the count), else through a host copy."""
    if failure is not None:
        buffer[:-1] = 0.0
    buffer[-1] = 0.0 if failure is None else 1.0
    if xp is np:
        comm.allreduce_sum(buffer)
        failed = int(buffer[-1])
    elif comm.allreduce_sum_on_device(buffer):
        failed = int(float(buffer[-1]))
    else:
        host = xp.asnumpy(buffer)
        comm.allreduce_sum(host)
        buffer[...] = xp.asarray(host)
        failed = int(host[-1])
    if failed:
        if failure is not None:
            raise failure
        raise RuntimeError(f"{failed} other rank(s) failed {stage} (see the error raised there)")


def _backend(on_gpu: bool, compute: np.dtype):
    """(LinearOps, RangeKernel) of the layer's array type."""
    if on_gpu:
        from fastxent.gpu.linear import CupyLinearOps
        from fastxent.gpu.partial import CupyKernel

        return CupyLinearOps(compute), CupyKernel()
    from fastxent.cpu.linear import NumpyLinearOps
    from fastxent.cpu.xent import NumpyKernel

    return NumpyLinearOps(compute), NumpyKernel()


def sharded_linear(
    comm: Communicator,
    hidden: Any,
    weight: Any,
    bias: Any,
    labels: np.ndarray,
    *,
    vocab_start: int,
    settings: Settings,
    class_weight: Any,
    sample_weight: Any,
    memory_budget: Optional[int],
    block_rows: Optional[int],
    local_error: Optional[Exception],
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
) -> Tuple[Any, Optional[Any], Optional[Any], Optional[Any]]:
    """Loss and gradients of the vocabulary-parallel linear + cross-entropy on this rank.

    Args:
        comm: the group's adapter.
        hidden: (..., H) NumPy or CuPy array, identical on every rank.
        weight: (V_r, H) this rank's rows of the output layer, hidden's type, dtype and device.
        bias: (V_r,) or None.
        labels: integer NumPy array, hidden's shape without H: global class ids.
        vocab_start: the shard's first global class.
        settings: the checked options (the user's reduction).
        class_weight: this shard's (V_r,) class weights (host) or None.
        sample_weight: None or broadcastable to ``labels`` (host), identical on every rank.
        memory_budget, block_rows: the chunk's budget in bytes of logits, or its rows.
        local_error: an argument error this rank found; every rank raises it.
        want_hidden, want_weight, want_bias: the gradients to compute.

    Returns:
        (loss as the core reduces it, d hidden (..., H) identical on every rank, d weight shard,
        d bias shard), gradients in the inputs' dtype and array type, None where not wanted.
    """
    on_gpu = local_error is None and checks.is_cupy_array(hidden)
    lead_shape = tuple(labels.shape)
    num_rows = int(np.prod(lead_shape, dtype=np.int64))
    width = 0 if local_error is not None else int(weight.shape[0])
    itemsize = 8 if local_error is None and hidden.dtype == np.float64 else 4
    planned = _linear.plan_blocks(num_rows, max(width, 1), itemsize, memory_budget=memory_budget, block_rows=block_rows)
    step = _agree_on_chunks(comm, planned.grad_rows, local_error)

    dtype = hidden.dtype
    compute = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    features = hidden.shape[-1]
    ops, kernel = _backend(on_gpu, compute)
    xp: Any = np
    if on_gpu:
        import cupy as xp
    with checks.device_scope(hidden):
        flat_hidden = xp.ascontiguousarray(hidden.reshape(num_rows, features), dtype=compute)
        weight_c = xp.ascontiguousarray(weight, dtype=compute)
        bias_c = None if bias is None else xp.ascontiguousarray(bias, dtype=compute)
        flat_labels = labels.reshape(-1)
        row_weight = checks.row_weights(sample_weight, lead_shape)
        chunk_settings = settings._replace(reduction="sum")
        grad_hidden = None
        if want_hidden:
            # On the host, one more value after dX: the failure count its all-reduction carries.
            # On the GPU the same layout, in device memory: reduced there where the engine can.
            host_hidden = np.empty(num_rows * features + 1, dtype=compute) if not on_gpu else None
            if on_gpu:
                device_hidden = xp.empty(num_rows * features + 1, dtype=compute)
                grad_hidden = device_hidden[:-1].reshape(num_rows, features)
            else:
                grad_hidden = host_hidden[:-1].reshape(num_rows, features)
        grad_weight = xp.zeros(weight_c.shape, dtype=compute) if want_weight else None
        grad_bias = xp.zeros(width, dtype=np.float64) if want_bias else None
        want_any = want_hidden or want_weight or want_bias

        per_row = np.zeros(num_rows)
        weight_sum = counted = 0.0
        buffer = ops.empty((min(step, max(num_rows, 1)), width))
        # A failure of this rank's own work since its last collective: the next one carries it.
        failure: Optional[BaseException] = None
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            chunk_hidden = flat_hidden[lo:hi]
            # 1. This rank's logits of the chunk (one GEMM).
            chunk = None
            try:
                chunk = ops.logits(chunk_hidden, weight_c, bias_c, buffer[: hi - lo])
            except Exception as error:
                failure = error
            # 2. The global statistics (two all-reductions), losses and this slice's gradient;
            #    every rank raises here if any rank failed since its last collective.
            shard = Shard(chunk, vocab_start, width, dtype, class_weight, error=failure)
            try:
                forward = sharded_forward(comm, kernel, shard, flat_labels[lo:hi], chunk_settings, row_weight[lo:hi])
            except ValueError as error:
                _raise_with_position(error, comm, labels, settings)
            per_row[lo:hi] = forward.per_row_loss
            weight_sum += float(np.sum(row_weight[lo:hi] * forward.target_weight))
            counted += float(np.count_nonzero(forward.labels != IGNORED))
            if not want_any:
                continue
            try:
                grad = forward.grad(inplace=True)
                # 3. This slice's share of the hidden gradient, and its own weight and bias gradients.
                if want_hidden:
                    ops.hidden_grad(grad, weight_c, grad_hidden[lo:hi])
                if want_weight:
                    ops.accumulate_weight_grad(grad, chunk_hidden, grad_weight)
                if want_bias:
                    ops.accumulate_bias_grad(grad, grad_bias)
            except Exception as error:
                failure = error

        if settings.reduction == "mean":
            denominator = weight_sum
        elif settings.reduction == "sum_over_batch_size":
            denominator = counted
        else:
            denominator = 1.0
        scale = checks.grad_scale_for(denominator)
        if want_hidden:
            # dX = sum over ranks of G_r W_r: each rank holds its own term. One more value says
            # how many ranks failed after their last chunk's statistics.
            buffer = device_hidden if on_gpu else host_hidden
            sum_with_failures(comm, buffer, failure, "after the last chunk's statistics", xp)
        elif want_any:
            _agree_on_status(comm, failure)
        elif failure is not None:
            raise failure
        loss = checks.reduce_loss(per_row, settings.reduction, denominator, lead_shape, checks.loss_dtype(dtype), np)
        grads = []
        for grad, shape in ((grad_hidden, tuple(hidden.shape)), (grad_weight, None), (grad_bias, None)):
            if grad is None:
                grads.append(None)
                continue
            if scale != 1.0:
                grad *= scale
            grad = grad.astype(dtype, copy=False)
            grads.append(grad if shape is None else grad.reshape(shape))
        if on_gpu:
            loss = xp.asarray(loss)
    return (loss, *grads)
