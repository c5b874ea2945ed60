"""Vocabulary-parallel (class-sharded) cross-entropy over MPI (mpi4py) or torch.distributed.

Each rank holds a class range [vocab_start, vocab_start + V_local) of every row's logits; the
labels (global class ids), sample weights and options are the same on every rank. The loss is
the one a single process computes on the concatenated logits, and each rank gets the gradient
of its own slice. Per call two all-reductions of per-row statistics move (12 bytes per row per
rank for float32 logits, 16 with class weights, see ``fastxent.distributed._sharded``); the logits never do.

``group`` is an mpi4py communicator or a torch.distributed process group; None means torch's
default group when torch.distributed is initialised, else ``MPI.COMM_WORLD``. NumPy logits run
the Numba kernels; CuPy logits run the CUDA kernels (``fastxent.gpu.partial``) and get CuPy
results, while the O(N) statistics travel through the group from host memory. For PyTorch
tensors and autograd use ``fastxent.distributed._torch.vocab_parallel_cross_entropy``
(re-exported by ``fastxent.torch``).

``linear_cross_entropy[_with_grad]`` shard the output layer instead of the logits: each rank
holds rows of the weight and computes its logits one chunk of rows at a time
(``fastxent.distributed._linear``); ``linear_token_stats[_forward/_backward]`` give the per-token
statistics of such a head (``fastxent.distributed._token_stats``).

Imports run one way: this package imports the shared checks (``fastxent._checks``), the range
layer (``fastxent._range``: statistics, merge, epilogue) and each backend's range kernel
(``fastxent.cpu.xent.NumpyKernel``, ``fastxent.gpu.partial.CupyKernel``); ``_torch`` adds the
torch interop (``fastxent._torch_interop``). Nothing in the core imports it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fastxent import _checks as checks
from fastxent._checks import Reduction
from fastxent.distributed import _linear
from fastxent.distributed._comm import Communicator, communicator_for
from fastxent.distributed._sharded import (
    Shard,
    ShardLayout,
    check_labels,
    check_settings,
    sharded_forward,
)

__all__ = [
    "Communicator",
    "ShardLayout",
    "communicator_for",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "linear_token_stats",
    "linear_token_stats_backward",
    "linear_token_stats_forward",
    "sparse_cross_entropy",
    "sparse_cross_entropy_with_grad",
]


def _on_host(value: Any) -> Any:
    """A CuPy array's values in host memory (the O(N) inputs the collectives need); else as is."""
    if value is not None and checks.is_cupy_array(value):
        return value.get()
    return value


def _local_rows(local_logits: Any, lead_shape: tuple, axis: int, inplace: bool, from_logits: bool):
    """(N, V_local) rows of this rank's logits, their class axis, and the array module.

    Raises for mistakes that may be this rank's alone; the caller hands them to the collective.
    """
    on_gpu = checks.is_cupy_array(local_logits)
    backend = checks.backend_for(local_logits)
    xp, logits = checks.as_logits(local_logits, backend)
    axis = checks.normalise_axis(axis, logits.ndim)
    own_lead = checks.lead_shape_of(logits.shape, axis)
    if own_lead != lead_shape:
        raise ValueError(
            f"labels shape {lead_shape} must equal the local logits' shape without the class axis, {own_lead}"
        )
    if inplace:
        checks.check_inplace(logits, xp)
    if on_gpu and not from_logits:
        raise ValueError(
            "from_logits=False with CuPy arrays is not supported: the GPU class-range kernels "
            "take logits (pass NumPy arrays or torch tensors for probabilities)"
        )
    return logits, checks.rows_view(logits, axis, xp), axis, xp


def _kernel_for(xp):
    """The range layer's kernel for the rows' array type."""
    if xp is np:
        from fastxent.cpu.xent import NumpyKernel

        return NumpyKernel()
    from fastxent.gpu.partial import CupyKernel

    return CupyKernel()


def _forward(
    local_logits,
    labels,
    *,
    vocab_start,
    group,
    inplace,
    from_logits,
    reduction,
    ignore_index,
    label_smoothing,
    class_weight,
    sample_weight,
    z_loss,
    softcap,
    axis,
):
    settings = check_settings(from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, vocab_start)
    labels = check_labels(_on_host(labels))
    comm = communicator_for(group)
    lead_shape = tuple(labels.shape)
    logits = rows = None
    xp, width, dtype, local_error = np, 0, np.dtype(np.float32), None
    try:
        logits, rows, axis, xp = _local_rows(local_logits, lead_shape, axis, inplace, settings.from_logits)
        width, dtype = rows.shape[1], logits.dtype
    except (TypeError, ValueError) as error:
        local_error = error
    shard = Shard(rows, vocab_start, width, dtype, _on_host(class_weight), local_error)
    forward = sharded_forward(comm, _kernel_for(xp), shard, labels, settings, _on_host(sample_weight))
    return forward, logits, axis, xp


def sparse_cross_entropy(
    local_logits: Any,
    labels: Any,
    *,
    vocab_start: int,
    group: Any = None,
    from_logits: bool = True,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    axis: int = -1,
):
    """Cross-entropy over a vocabulary sharded by class ranges across the ranks of ``group``.

    Every rank calls this with its own slice of the logits; all get the same loss, equal to
    ``fastxent.sparse_cross_entropy`` on the concatenated logits.

    Args:
        local_logits: this rank's (..., V_local) logits (classes on ``axis``), NumPy.
        labels: global class ids in [0, V_total), identical on every rank.
        vocab_start: this shard's first global class. Shards may differ in size; together they
            must tile [0, V_total) (checked once per layout; every rank raises otherwise).
        group: an mpi4py communicator, a torch.distributed process group, or None.
        class_weight: this shard's (V_local,) class weights, sharded like the logits.
        sample_weight: per-row weights, identical on every rank.
        from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, axis: as in
            ``fastxent.sparse_cross_entropy``, with their global meaning (smoothing over all
            V_total classes, z-loss on the global logsumexp, global reduction denominators).

    Returns:
        The loss, as ``fastxent.sparse_cross_entropy`` returns it; identical on every rank.

    Raises:
        ValueError: on every rank (never on some only), for a label outside [0, V_total), a
            negative probability, shards that do not tile the vocabulary, or arguments one rank
            gets wrong.
    """
    forward, _, _, xp = _forward(
        local_logits,
        labels,
        vocab_start=vocab_start,
        group=group,
        inplace=False,
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        axis=axis,
    )
    return forward.loss if xp is np else xp.asarray(forward.loss)


def sparse_cross_entropy_with_grad(
    local_logits: Any,
    labels: Any,
    *,
    vocab_start: int,
    group: Any = None,
    from_logits: bool = True,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    axis: int = -1,
    inplace: bool = False,
):
    """The loss and this rank's slice of d(loss)/d(logits); no communication beyond the loss's.

    Takes the arguments of ``sparse_cross_entropy`` plus ``inplace`` (write the gradient over
    ``local_logits``).

    Returns:
        (loss, grad): the loss, identical on every rank, and the gradient of this rank's slice
        with the local logits' shape and dtype (the ``local_logits`` array itself when inplace).
    """
    forward, logits, axis, xp = _forward(
        local_logits,
        labels,
        vocab_start=vocab_start,
        group=group,
        inplace=bool(inplace),
        from_logits=from_logits,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        axis=axis,
    )
    grad_rows = forward.grad(inplace=bool(inplace))
    loss = forward.loss if xp is np else xp.asarray(forward.loss)
    lead_shape = tuple(np.shape(labels))
    if inplace:
        return loss, checks.write_back(logits, forward.rows, grad_rows, axis, xp)
    return loss, checks.grad_like(grad_rows, lead_shape, axis, xp)


def _layer_arrays(hidden: Any, weight_shard: Any, bias: Any):
    """(hidden, weight, bias, error): NumPy arrays, or CuPy arrays on one device, checked; an
    error this rank found alone is returned for every rank to raise together."""
    try:
        on_gpu = [checks.is_cupy_array(a) for a in (hidden, weight_shard, bias) if a is not None]
        if any(on_gpu) and not all(on_gpu):
            raise TypeError("hidden, weight_shard and bias must all be NumPy arrays or all CuPy arrays")
        if not any(on_gpu):
            hidden, weight_shard = np.asarray(hidden), np.asarray(weight_shard)
            bias = None if bias is None else np.asarray(bias)
        elif len({int(a.device.id) for a in (hidden, weight_shard, bias) if a is not None}) > 1:
            raise ValueError("hidden, weight_shard and bias must be on one device")
        _linear.check_layer(hidden, weight_shard, bias)
    except (TypeError, ValueError) as error:
        return hidden, weight_shard, bias, error
    return hidden, weight_shard, bias, None


def _linear_call(
    hidden,
    weight_shard,
    labels,
    *,
    vocab_start,
    group,
    bias,
    reduction,
    ignore_index,
    label_smoothing,
    class_weight,
    sample_weight,
    z_loss,
    softcap,
    memory_budget,
    block_rows,
    want_hidden=False,
    want_weight=False,
    want_bias=False,
):
    settings = check_settings(True, reduction, ignore_index, label_smoothing, z_loss, softcap, vocab_start)
    labels = check_labels(_on_host(labels))
    hidden, weight_shard, bias, error = _layer_arrays(hidden, weight_shard, bias)
    if error is None and tuple(hidden.shape[:-1]) != tuple(labels.shape):
        error = ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's shape without H, {hidden.shape[:-1]}"
        )
    return _linear.sharded_linear(
        communicator_for(group),
        hidden,
        weight_shard,
        bias,
        labels,
        vocab_start=vocab_start,
        settings=settings,
        class_weight=_on_host(class_weight),
        sample_weight=_on_host(sample_weight),
        memory_budget=memory_budget,
        block_rows=block_rows,
        local_error=error,
        want_hidden=want_hidden,
        want_weight=want_weight,
        want_bias=want_bias and bias is not None,
    )


def linear_cross_entropy(
    hidden: Any,
    weight_shard: Any,
    labels: Any,
    *,
    vocab_start: int,
    group: Any = None,
    bias: Any = None,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` with the output layer's rows sharded across
    the ranks of ``group``, without the logits ever existing whole.

    Every rank passes the same hidden states and labels and its own rows of the layer; all get
    the same loss, equal to ``fastxent.linear_cross_entropy`` with the concatenated weight. Per
    chunk of rows, the same two all-reductions of per-row statistics as
    ``sparse_cross_entropy`` (see ``fastxent.distributed._linear``).

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64, NumPy or CuPy, identical on every rank.
        weight_shard: (V_local, H): rows [vocab_start, vocab_start + V_local) of the layer's
            weight, in ``nn.Linear``'s layout; hidden's dtype and array type.
        labels: integer array, hidden's shape without H: global class ids, identical on every rank.
        vocab_start: this shard's first global class; the shards must tile [0, V_total).
        group: an mpi4py communicator, a torch.distributed process group, or None.
        bias: this shard's (V_local,) bias, or None.
        class_weight: this shard's (V_local,) class weights.
        sample_weight: per-row weights, identical on every rank.
        reduction, ignore_index, label_smoothing, z_loss, softcap: as in
            ``fastxent.linear_cross_entropy``, with their global meaning.
        memory_budget, block_rows: the chunk of logits each rank holds (bytes, or rows); ranks
            agree on the smallest.

    Returns:
        The loss, identical on every rank (an array of hidden's kind).

    Raises:
        ValueError: on every rank together, for an argument one rank gets wrong (a weight shard
            of the wrong width, say), a label outside [0, V_total), shards that do not tile the
            vocabulary, or ranks passing different labels or sample weights.
    """
    loss, *_ = _linear_call(
        hidden,
        weight_shard,
        labels,
        vocab_start=vocab_start,
        group=group,
        bias=bias,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        memory_budget=memory_budget,
        block_rows=block_rows,
    )
    return loss


def linear_cross_entropy_with_grad(
    hidden: Any,
    weight_shard: Any,
    labels: Any,
    *,
    vocab_start: int,
    group: Any = None,
    bias: Any = None,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight: Any = None,
    sample_weight: Any = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    hidden_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
):
    """The loss and its gradients, computed in the same call; the arguments of
    ``linear_cross_entropy`` plus flags that skip a gradient and its work.

    Returns:
        (loss, grad_hidden (..., H), grad_weight_shard (V_local, H), grad_bias_shard
        (V_local,)): the loss and ``grad_hidden`` identical on every rank (``grad_hidden`` is
        all-reduced once per call), the shard gradients this rank's own; each in the inputs'
        dtype, None where skipped (``grad_bias_shard`` without a bias). With reduction "none"
        the gradients are those of the sum of the per-row losses.
    """
    return _linear_call(
        hidden,
        weight_shard,
        labels,
        vocab_start=vocab_start,
        group=group,
        bias=bias,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weight=class_weight,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        memory_budget=memory_budget,
        block_rows=block_rows,
        want_hidden=bool(hidden_grad),
        want_weight=bool(weight_grad),
        want_bias=bool(bias_grad),
    )


# ----------------------------------------------------------------------------------------
# Per-token statistics from a vocabulary-sharded head
# ----------------------------------------------------------------------------------------


def _token_setup(temperature, softcap, ignore_index, memory_budget, block_rows, block_classes, threads):
    """``fastxent._linear_api.token_layer_setup`` with this call's options, for each rank's slice."""
    from fastxent._linear_api import token_layer_setup

    def setup(hidden, weight, bias):
        return token_layer_setup(
            hidden, weight, bias, temperature, softcap, ignore_index, memory_budget, block_rows, block_classes, threads
        )

    return setup


def _token_layer(hidden, weight_shard, bias, labels):
    """Host arrays and this rank's argument error (every rank raises it together)."""
    hidden, weight_shard, bias, error = _layer_arrays(hidden, weight_shard, bias)
    if error is None and checks.is_cupy_array(hidden):
        error = NotImplementedError("linear_token_stats takes NumPy arrays (the CPU) so far; got CuPy arrays")
    if error is None and labels is not None and tuple(hidden.shape[:-1]) != tuple(labels.shape):
        error = ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's shape without H, {hidden.shape[:-1]}"
        )
    return hidden, weight_shard, bias, error


def linear_token_stats_forward(
    hidden: Any,
    weight_shard: Any,
    labels: Any,
    *,
    vocab_start: int,
    group: Any = None,
    bias: Any = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    threads: Optional[int] = None,
):
    """``linear_token_stats`` and the merged per-row statistics ``linear_token_stats_backward``
    takes (a ``TokenForward``: ``.values`` holds the ``TokenStats``)."""
    from fastxent.distributed._token_stats import sharded_token_forward

    labels = check_labels(_on_host(labels))
    hidden, weight_shard, bias, error = _token_layer(hidden, weight_shard, bias, labels)
    setup = _token_setup(temperature, softcap, ignore_index, memory_budget, block_rows, block_classes, threads)
    return sharded_token_forward(
        communicator_for(group),
        setup,
        hidden,
        weight_shard,
        bias,
        labels,
        vocab_start=int(vocab_start),
        ignore_index=ignore_index,
        local_error=error,
    )


def linear_token_stats(
    hidden: Any,
    weight_shard: Any,
    labels: Any,
    *,
    vocab_start: int,
    group: Any = None,
    bias: Any = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    memory_budget: Optional[int] = None,
    block_rows: Optional[int] = None,
    block_classes: Optional[int] = None,
    threads: Optional[int] = None,
):
    """``fastxent.linear_token_stats`` with the head's rows sharded across the ranks of
    ``group``: per token the log-probability, entropy, logsumexp and argmax of
    ``softcap(hidden @ weight.T + bias) / temperature`` over the whole vocabulary, without any
    rank building logits (see ``fastxent.distributed._token_stats``).

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64 NumPy array, identical on every rank.
        weight_shard: (V_local, H): rows [vocab_start, vocab_start + V_local) of the head's
            weight; hidden's dtype. A rank may hold none (V_local = 0).
        labels: integer class ids over the whole vocabulary, hidden's shape without H,
            identical on every rank.
        vocab_start: this shard's first global class; the shards must tile [0, V_total).
        group: an mpi4py communicator, a torch.distributed process group, or None.
        bias: this shard's (V_local,) bias, or None.
        temperature, softcap, ignore_index: as ``fastxent.token_stats``.
        memory_budget, block_rows, block_classes, threads: each rank's blocks, as
            ``fastxent.linear_token_stats``.

    Returns:
        ``TokenStats(logprob, entropy, lse, argmax)``, labels-shaped, identical on every rank
        (argmax over the whole vocabulary, the lowest index on ties).

    Raises:
        ValueError: on every rank together, for an argument one rank gets wrong, a label
            outside [0, V_total) (its value and position), or shards that do not tile the
            vocabulary. Any other failure on one rank raises on every rank too.
        NotImplementedError: CuPy arrays (the CPU only so far).
    """
    return linear_token_stats_forward(
        hidden,
        weight_shard,
        labels,
        vocab_start=vocab_start,
        group=group,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        memory_budget=memory_budget,
        block_rows=block_rows,
        block_classes=block_classes,
        threads=threads,
    ).values


def linear_token_stats_backward(
    hidden: Any,
    weight_shard: Any,
    forward: Any,
    grad_logprob: Any,
    grad_entropy: Any,
    grad_lse: Any = None,
    *,
    vocab_start: int,
    group: Any = None,
    bias: Any = None,
    want_hidden: bool = True,
    want_weight: bool = True,
    want_bias: bool = True,
    memory_budget: Optional[int] = None,
    threads: Optional[int] = None,
):
    """Gradients of sum(grad_logprob * logprob + grad_entropy * entropy + grad_lse * lse) from
    the ``forward`` (``linear_token_stats_forward``) of the same arrays and group.

    The upstream gradients are labels-shaped (or broadcastable), identical on every rank, None
    for 0. Returns (d hidden: hidden's shape and dtype, identical on every rank, summed over the
    ranks in one all-reduction; d weight_shard and d bias of this rank's rows), None where not
    wanted.
    """
    from fastxent.distributed._token_stats import sharded_token_backward

    hidden, weight_shard, bias, error = _token_layer(hidden, weight_shard, bias, None)
    setup = _token_setup(forward.temperature, forward.softcap, None, memory_budget, None, None, threads)
    return sharded_token_backward(
        communicator_for(group),
        setup,
        hidden,
        weight_shard,
        bias,
        forward,
        grad_logprob,
        grad_entropy,
        grad_lse,
        vocab_start=int(vocab_start),
        want_hidden=bool(want_hidden),
        want_weight=bool(want_weight),
        want_bias=bool(want_bias),
        local_error=error,
    )
