"""The public linear + cross-entropy entry points: validate, normalise, dispatch by array type.

``linear_cross_entropy(hidden, weight, labels)`` is ``sparse_cross_entropy(hidden @ weight.T +
bias, labels)`` without the (N, V) logits ever existing: every option means what it means in
the core API applied to those logits. The schedule lives in ``fastxent._linear`` (no backend);
NumPy arrays run it with the CPU launcher ``fastxent.cpu.linear``, CuPy arrays with the GPU's,
``fastxent.gpu.linear``.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import numpy as np

from fastxent import _checks as checks
from fastxent._api import prepare_targets
from fastxent._checks import Reduction
from fastxent._linear import DEFAULT_MEMORY_BUDGET, LinearBlocks, plan_blocks
from fastxent._token_range import finish_token_stats
from fastxent._token_stats_api import TokenForward, TokenStats, check_temperature, upstream_rows

# linear_token_stats holds at most this fraction of the float32 logits by default.
TOKEN_LOGITS_FRACTION = 16

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "linear_token_stats",
    "linear_token_stats_backward",
    "linear_token_stats_forward",
]


def _to_host(array: Any) -> Any:
    """A CuPy array's NumPy copy; anything else as it is."""
    return array.get() if checks.is_cupy_array(array) else array


def _check_positive(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None; got {value!r}")


def _on_gpu(hidden: Any, weight: Any, bias: Any) -> bool:
    """Whether the layer is on a GPU: hidden, weight and bias all CuPy arrays on one device
    (TypeError for a mix of host and device arrays, ValueError for two devices)."""
    arrays = {"hidden": hidden, "weight": weight, "bias": bias}
    on_device = {name: checks.is_cupy_array(a) for name, a in arrays.items() if a is not None}
    if not any(on_device.values()):
        return False
    if not all(on_device.values()):
        where = ", ".join(f"{name} {'CuPy' if gpu else type(arrays[name]).__name__}" for name, gpu in on_device.items())
        raise TypeError(f"hidden, weight and bias must all be NumPy arrays or all CuPy arrays; got {where}")
    devices = {name: int(arrays[name].device.id) for name in on_device}
    if len(set(devices.values())) > 1:
        raise ValueError(f"hidden, weight and bias must be on one device; got devices {devices}")
    return True


def _check_arrays(hidden: Any, weight: Any, bias: Any) -> Tuple[Any, Any, Optional[Any]]:
    """hidden (..., H), weight (V, H), bias (V,) of one floating dtype: NumPy arrays (anything
    array-like becomes one) or CuPy arrays on one device."""
    if not _on_gpu(hidden, weight, bias):
        hidden, weight = np.asarray(hidden), np.asarray(weight)
        bias = None if bias is None else np.asarray(bias)
    if hidden.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64; got dtype {hidden.dtype}")
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have at least one dimension (the features); got shape {hidden.shape}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, H) as nn.Linear's; got shape {weight.shape}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight shape {weight.shape} does not match hidden shape {hidden.shape}: "
            f"weight must be (V, {hidden.shape[-1]})"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight has no classes: shape {weight.shape}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), one entry per class; got {bias.shape}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    return hidden, weight, bias


def _run(
    hidden,
    weight,
    labels,
    *,
    bias,
    ignore_index,
    label_smoothing,
    class_weight,
    sample_weight,
    z_loss,
    softcap,
    reduction,
    memory_budget,
    block_rows,
    block_classes,
    threads=None,
    want_hidden=False,
    want_weight=False,
    want_bias=False,
):
    checks.check_options(True, reduction, label_smoothing, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
    sizes = ("memory_budget", memory_budget), ("block_rows", block_rows), ("block_classes", block_classes)
    for name, value in sizes + (("threads", threads),):
        _check_positive(name, value)
    hidden, weight, bias = _check_arrays(hidden, weight, bias)
    on_gpu = checks.is_cupy_array(hidden)
    lead_shape = tuple(hidden.shape[:-1])
    num_classes, features = weight.shape
    # The schedule keeps labels and per-row numbers on the host, whatever the layer's device:
    # device labels and weights come over once (O(N) numbers).
    labels, class_weight, sample_weight = (_to_host(a) for a in (labels, class_weight, sample_weight))
    labels = checks.check_labels(labels, np, lead_shape)
    flat_labels, row_weight, options, denominator, _ = prepare_targets(
        labels,
        num_classes,
        np,
        from_logits=True,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
    )
    num_rows = flat_labels.shape[0]
    launcher, blocks = _launcher_and_blocks(
        hidden,
        num_rows,
        num_classes,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        threads=threads,
        want_grads=want_hidden or want_weight or want_bias,
    )

    per_row, hidden_grad, weight_grad, bias_grad = launcher.linear_xent(
        hidden.reshape(num_rows, features),
        weight,
        bias,
        flat_labels,
        row_weight,
        options,
        blocks,
        want_hidden=want_hidden,
        want_weight=want_weight,
        want_bias=want_bias and bias is not None,
    )
    xp = np
    if on_gpu:
        import cupy as xp

        with hidden.device:
            per_row = xp.asarray(per_row)
    with checks.device_scope(hidden):
        loss = checks.reduce_loss(per_row, reduction, denominator, lead_shape, checks.loss_dtype(hidden.dtype), xp)
    if hidden_grad is not None:
        hidden_grad = hidden_grad.reshape(hidden.shape)
    return loss, hidden_grad, weight_grad, bias_grad


def plan_linear_blocks(
    num_rows: int,
    num_classes: int,
    dtype: Any,
    *,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    features: int = 1,
    max_workers: int = 1,
    threads: Optional[int] = None,
) -> LinearBlocks:
    """The block shapes and worker count a call with these sizes uses (``dtype``: the inputs';
    blocks hold the compute type, float32 for half precision; ``max_workers``: the backend's
    thread count, used from ``fastxent._linear.PARALLEL_MIN_WORK`` multiply-adds)."""
    itemsize = 8 if np.dtype(dtype) == np.float64 else 4
    return plan_blocks(
        num_rows,
        num_classes,
        itemsize,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        features=features,
        max_workers=max_workers,
        workers=threads,
    )


def linear_cross_entropy(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: Reduction = "mean",
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    threads: Optional[int] = None,
):
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` without materialising them.

    One GEMM's work: blocks of logits, each consumed by the statistics kernel while cached.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64, a NumPy array (CPU) or a CuPy array
            (its GPU; weight and bias on the same device): the layer's input.
        weight: (V, H) of the hidden's dtype, ``nn.Linear``'s layout: logits = hidden @ weight.T.
        labels: integer array of class indices, the hidden's shape without H.
        bias: (V,) of the hidden's dtype, added to the logits, or None.
        ignore_index, label_smoothing, class_weight, sample_weight, z_loss, softcap, reduction:
            exactly as in ``fastxent.sparse_cross_entropy`` on the logits (class_weight (V,)).
        memory_budget: bytes of logits held at once (default: the smaller of 256 MiB and an
            eighth of the N x V logits, in the compute type; on a GPU the smaller of 4 GiB and
            half the device's free memory, or ``FASTXENT_GPU_LINEAR_BUDGET`` bytes).
        block_rows, block_classes: override the block shapes (rows per block or chunk; classes
            per block of the loss-only pass).
        threads: worker threads that share the blocks, each running its GEMMs single-threaded
            and its kernels on the blocks it just computed (default: NumPy's BLAS thread count
            for problems of 2^30 multiply-adds or more, else 1). While workers run, NumPy's
            BLAS is single-threaded process-wide (OpenBLAS has only a process-wide setting).

    Returns:
        The loss, float32 (float64 for float64 inputs), an array of the hidden's kind: 0-d, or the
        labels' shape for "none".
    """
    loss, *_ = _run(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        threads=threads,
    )
    return loss


def linear_cross_entropy_with_grad(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: Reduction = "mean",
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    threads: Optional[int] = None,
    hidden_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
):
    """Loss and its gradients w.r.t. hidden, weight and bias, computed in the same call.

    Three GEMMs' work (logits, hidden gradient, weight gradient), nothing recomputed: chunks of
    rows over the whole vocabulary, each turned into loss and gradient in place. With reduction
    "none" the gradients are those of the sum of the per-row losses.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64, a NumPy array (CPU) or a CuPy array
            (its GPU; weight and bias on the same device): the layer's input.
        weight: (V, H) of the hidden's dtype, ``nn.Linear``'s layout: logits = hidden @ weight.T.
        labels: integer array of class indices, the hidden's shape without H.
        bias: (V,) of the hidden's dtype, added to the logits, or None.
        ignore_index, label_smoothing, class_weight, sample_weight, z_loss, softcap, reduction:
            exactly as in ``fastxent.sparse_cross_entropy`` on the logits (class_weight (V,)).
        memory_budget: bytes of logits held at once (default: the smaller of 256 MiB and an
            eighth of the N x V logits, in the compute type; on a GPU the smaller of 4 GiB and
            half the device's free memory, or ``FASTXENT_GPU_LINEAR_BUDGET`` bytes).
        block_rows, block_classes: override the block shapes (rows per block or chunk; classes
            per block of the loss-only pass).
        threads: worker threads that share the blocks, each running its GEMMs single-threaded
            and its kernels on the blocks it just computed (default: NumPy's BLAS thread count
            for problems of 2^30 multiply-adds or more, else 1). While workers run, NumPy's
            BLAS is single-threaded process-wide (OpenBLAS has only a process-wide setting).
        hidden_grad, weight_grad, bias_grad: False skips that gradient and its work (a frozen
            head: ``weight_grad=False, bias_grad=False`` saves the dW GEMM).

    Returns:
        (loss, grad_hidden (..., H), grad_weight (V, H), grad_bias (V,)), each gradient in the
        inputs' dtype; None where skipped, grad_bias None without a bias. When no gradient is
        wanted the call is ``linear_cross_entropy``'s (one GEMM).
    """
    return _run(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        threads=threads,
        want_hidden=bool(hidden_grad),
        want_weight=bool(weight_grad),
        want_bias=bool(bias_grad),
    )


# ----------------------------------------------------------------------------------------
# Per-token statistics from hidden states (see fastxent._token_stats_api for the logits' form)
# ----------------------------------------------------------------------------------------


def _launcher_and_blocks(
    hidden, num_rows, num_classes, *, memory_budget, block_rows, block_classes, threads, want_grads
):
    """The launcher module of the hidden states' device and its chunks: on the GPU whole rows,
    as many as the budget (else the device's free memory) holds (``block_classes`` has no use
    there); on the CPU cache blocks of rows and classes."""
    features = hidden.shape[-1]
    if checks.is_cupy_array(hidden):
        from fastxent.gpu import linear as launcher

        blocks = launcher.plan(
            num_rows,
            num_classes,
            hidden.dtype,
            memory_budget=memory_budget,
            block_rows=block_rows,
            want_grads=want_grads,
            device_id=int(hidden.device.id),
        )
        return launcher, blocks
    from fastxent.cpu import linear as launcher

    blocks = plan_linear_blocks(
        num_rows,
        num_classes,
        hidden.dtype,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        features=features,
        max_workers=launcher.max_workers(),
        threads=threads,
    )
    return launcher, blocks


def token_layer_setup(
    hidden, weight, bias, temperature, softcap, ignore_index, memory_budget, block_rows, block_classes, threads
):
    """The checked arrays of one ``linear_token_stats`` call (hidden as rows (N, H)), its
    temperature and softcap, the CPU launcher and the blocks: (rows, weight, bias, launcher,
    blocks, temperature, softcap). The labels are the caller's to check."""
    checks.check_options(True, "none", 0.0, ignore_index=ignore_index, softcap=softcap)
    temperature = check_temperature(temperature)
    sizes = ("memory_budget", memory_budget), ("block_rows", block_rows), ("block_classes", block_classes)
    for name, value in sizes + (("threads", threads),):
        _check_positive(name, value)
    hidden, weight, bias = _check_arrays(hidden, weight, bias)
    num_classes, features = weight.shape
    num_rows = int(np.prod(hidden.shape[:-1], dtype=np.int64))
    if memory_budget is None and not checks.is_cupy_array(hidden):
        # A sixteenth of the float32 logits at most (the forward holds far less: cache blocks).
        memory_budget = max(1, min(DEFAULT_MEMORY_BUDGET, num_rows * num_classes * 4 // TOKEN_LOGITS_FRACTION))
    launcher, blocks = _launcher_and_blocks(
        hidden,
        num_rows,
        num_classes,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        threads=threads,
        want_grads=True,
    )
    softcap = None if softcap is None else float(softcap)
    return hidden.reshape(num_rows, features), weight, bias, launcher, blocks, temperature, softcap


def _token_setup(
    hidden, weight, bias, labels, temperature, softcap, ignore_index, memory_budget, block_rows, block_classes, threads
):
    """``token_layer_setup`` and the labels: int64 (N,) (-1 ignored) and the lead shape."""
    rows, weight, bias, launcher, blocks, temperature, softcap = token_layer_setup(
        hidden, weight, bias, temperature, softcap, ignore_index, memory_budget, block_rows, block_classes, threads
    )
    lead_shape = tuple(np.shape(hidden)[:-1])
    on_gpu = checks.is_cupy_array(rows)
    if on_gpu and checks.is_cupy_array(labels):
        labels = labels.get()  # checked on the host: one read of N integers
    labels = checks.check_labels(labels, np, lead_shape)
    flat_labels, *_ = prepare_targets(
        labels,
        weight.shape[0],
        np,
        from_logits=True,
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=0.0,
        class_weight=None,
        sample_weight=None,
        z_loss=0.0,
        softcap=softcap,
    )
    if on_gpu:
        import cupy

        with rows.device:
            flat_labels = cupy.asarray(flat_labels)
    return rows, weight, bias, flat_labels, lead_shape, launcher, blocks, temperature, softcap


def linear_token_stats_forward(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    threads: Optional[int] = None,
) -> TokenForward:
    """``linear_token_stats`` and the per-row statistics ``linear_token_stats_backward`` takes."""
    rows, weight, bias, flat_labels, lead_shape, launcher, blocks, temperature, softcap = _token_setup(
        hidden,
        weight,
        bias,
        labels,
        temperature,
        softcap,
        ignore_index,
        memory_budget,
        block_rows,
        block_classes,
        threads,
    )
    stats = launcher.linear_token_row_stats(rows, weight, bias, flat_labels, blocks, temperature, softcap)
    values = finish_token_stats(stats, flat_labels, checks.backend_for(rows).xp)
    dtype = checks.loss_dtype(rows.dtype)
    shaped = TokenStats(*(v.reshape(lead_shape).astype(dtype) for v in values[:3]), values.argmax.reshape(lead_shape))
    return TokenForward(shaped, stats, flat_labels, -1, temperature, softcap)


def linear_token_stats_backward(
    hidden: Any,
    weight: Any,
    forward: TokenForward,
    grad_logprob: Any,
    grad_entropy: Any,
    grad_lse: Any = None,
    *,
    bias: Any = None,
    want_hidden: bool = True,
    want_weight: bool = True,
    want_bias: bool = True,
    memory_budget: Optional[int] = None,
    threads: Optional[int] = None,
):
    """Gradients w.r.t. hidden, weight and bias of sum(grad_logprob * logprob + grad_entropy *
    entropy + grad_lse * lse), from the ``forward`` of the same arrays (upstream gradients
    labels-shaped or broadcastable, None for 0). The logits are computed again in chunks of
    rows (three GEMMs' work). Returns (d hidden, d weight, d bias) in the inputs' dtype, None
    where not wanted (d bias without a bias too)."""
    rows, weight, bias, _, lead_shape, launcher, blocks, _, _ = _token_setup(
        hidden,
        weight,
        bias,
        np.zeros(np.shape(hidden)[:-1], np.int64),
        forward.temperature,
        forward.softcap,
        None,
        memory_budget,
        None,
        None,
        threads,
    )
    xp = checks.backend_for(rows).xp
    labels, a, b, c = upstream_rows(forward.labels, grad_logprob, grad_entropy, grad_lse, lead_shape, xp)
    grad_hidden, grad_weight, grad_bias = launcher.linear_token_grads(
        rows,
        weight,
        bias,
        labels,
        forward.stats,
        a,
        b,
        c,
        blocks,
        forward.temperature,
        forward.softcap,
        want_hidden=bool(want_hidden),
        want_weight=bool(want_weight),
        want_bias=bool(want_bias) and bias is not None,
    )
    if grad_hidden is not None:
        grad_hidden = grad_hidden.reshape(np.shape(hidden))
    return grad_hidden, grad_weight, grad_bias


def linear_token_stats(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    threads: Optional[int] = None,
) -> TokenStats:
    """``fastxent.token_stats`` of the logits ``hidden @ weight.T + bias`` without building them.

    One GEMM's work: blocks of logits small enough to stay in cache, each swept by the
    statistics kernel and merged exactly into every row's running statistics (the entropy's
    accumulator and the argmax merge across blocks like the max and the sum of exps).

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64, NumPy (the CPU) or CuPy (the GPU:
            chunks of whole rows, a GEMM and the statistics kernel each, no host reads but one
            of the labels).
        weight: (V, H) of the hidden's dtype and array type, ``nn.Linear``'s layout.
        labels: integer class indices, the hidden's shape without H.
        bias: (V,) or None.
        temperature, softcap, ignore_index: as ``fastxent.token_stats``.
        memory_budget, block_rows, block_classes, threads: as ``linear_cross_entropy`` (the
            default budget: the smaller of 256 MiB and a sixteenth of the float32 logits).

    Returns:
        ``TokenStats(logprob, entropy, lse, argmax)``, labels-shaped.
    """
    return linear_token_stats_forward(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        threads=threads,
    ).values
