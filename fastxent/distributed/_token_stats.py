"""Vocabulary-parallel per-token statistics from hidden states: each rank holds a slice of the
head's rows, no rank builds any logits.

Forward: each rank computes its slice's ``TokenRowStats`` with the single-process kernels
(``fastxent.cpu.linear.linear_token_row_stats``: blocks of logits that stay in cache), its
argmax counted over the whole vocabulary; one SUM all-reduction gathers every rank's six (N,)
statistics into a (ranks, 6, N) float64 buffer (zeros elsewhere: adding zeros is exact), and
every rank merges them in rank order (``merge_token_stats``), so every rank holds the same
merged statistics and the same results.

Backward: with the merged statistics each rank turns its slice's logits, computed again in
chunks, into their gradient (``linear_token_grads``), which gives its own weight and bias
gradients and its term of d hidden (G_r W_r); one more SUM all-reduction adds the terms.

Errors: an argument error or any failure on one rank raises on every rank. The first
collective (the shard layout, then a MAX of each rank's argument status) agrees on argument
errors; a failure after it travels in one more value of the gather (forward) or of d hidden's
reduction (backward).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from fastxent import _checks as checks
from fastxent._range import ELSEWHERE, IGNORED, compute_dtype, local_labels
from fastxent._token_range import TokenRowStats, finish_token_stats, merge_token_stats, shift_argmax
from fastxent._token_stats_api import TokenForward, TokenStats, upstream_rows
from fastxent.distributed._comm import Communicator
from fastxent.distributed._linear import sum_with_failures
from fastxent.distributed._sharded import cached_layout, check_tiling, error_status, raise_agreed_error

# An argmax no real class has: an empty slice never wins a tie.
_NO_CLASS = float(2**62)
_FIELDS = len(TokenRowStats._fields)


def _neutral(num_rows: int) -> TokenRowStats:
    """The statistics of an empty slice: the merge's identity."""
    zeros = np.zeros(num_rows)
    minus_inf = np.full(num_rows, -np.inf)
    return TokenRowStats(minus_inf, zeros, zeros, zeros, minus_inf, np.full(num_rows, _NO_CLASS))


def _agree_on_arguments(comm: Communicator, vocab_start: int, width: int, error: Optional[Exception]):
    """The verified shard layout, after every rank has raised any rank's argument error."""
    layout = cached_layout(comm, vocab_start, width) or check_tiling(comm, vocab_start, width)
    status = comm.allreduce_max(np.array([error_status(comm, error)]))
    raise_agreed_error(comm, float(status[0]), error, "checking its arguments")
    return layout


def _checked_labels(labels: np.ndarray, ignore_index: Optional[int], num_classes: int) -> np.ndarray:
    """int64 (N,) global labels, IGNORED for ``ignore_index``; ValueError naming the first label
    outside [0, num_classes) and its position."""
    flat = labels.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        flat = np.where(flat == ignore_index, IGNORED, flat)
    bad = np.flatnonzero((flat != IGNORED) & ((flat < 0) | (flat >= num_classes)))
    if bad.size:
        first = int(bad[0])
        position = tuple(int(i) for i in np.unravel_index(first, labels.shape))
        raise ValueError(
            f"label {int(labels.reshape(-1)[first])} at position {position} is outside the valid range "
            f"[0, {num_classes})" + ("" if ignore_index is None else f" (ignore_index={ignore_index})")
        )
    return flat


def _prepare(setup: Any, hidden: Any, weight: Any, bias: Any, width: int, error: Optional[Exception]):
    """(``setup``'s tuple or None, this rank's argument error or None). An empty slice is not
    given to ``setup`` (the single-process checks want classes): its options are checked on
    a one-class stand-in, and it computes nothing."""
    if error is not None:
        return None, error
    try:
        if width:
            return setup(hidden, weight, bias), None
        stand_in = np.zeros((1, np.shape(weight)[-1]), dtype=np.asarray(weight).dtype)
        rows, _, _, _, _, temperature, softcap = setup(hidden, stand_in, None if bias is None else stand_in[:, 0])
        return (rows, weight, bias, None, None, temperature, softcap), None
    except (TypeError, ValueError) as found:
        return None, found


def sharded_token_forward(
    comm: Communicator,
    setup: Any,
    hidden: Any,
    weight: Any,
    bias: Any,
    labels: np.ndarray,
    *,
    vocab_start: int,
    ignore_index: Optional[int],
    local_error: Optional[Exception],
) -> TokenForward:
    """``TokenForward`` of the whole vocabulary, identical on every rank.

    Args:
        comm: the group's adapter.
        setup: ``fastxent._linear_api.token_setup`` bound to this call's options (it returns the
            rows, arrays, launcher and blocks for this rank's slice, or raises).
        hidden: (..., H) identical on every rank; weight: (V_r, H) this rank's rows; bias: (V_r,)
            or None; labels: global class ids, hidden's shape without H.
        vocab_start: the slice's first global class.
        ignore_index: a label value that is not counted, or None.
        local_error: an argument error this rank found; every rank raises it.
    """
    width = 0 if local_error is not None else int(weight.shape[0])
    lead_shape = tuple(labels.shape)
    num_rows = int(np.prod(lead_shape, dtype=np.int64))
    prepared, local_error = _prepare(setup, hidden, weight, bias, width, local_error)
    layout = _agree_on_arguments(comm, vocab_start, width, local_error)
    flat_labels = _checked_labels(labels, ignore_index, layout.num_classes)
    rows, weight_c, bias_c, launcher, blocks, temperature, softcap = prepared

    # One SUM gathers every rank's statistics (zeros in the others' slots) and the failures.
    gathered = np.zeros(comm.size * _FIELDS * num_rows + 1)
    slots = gathered[:-1].reshape(comm.size, _FIELDS, num_rows)
    failure: Optional[BaseException] = None
    try:
        if width:
            mine = launcher.linear_token_row_stats(
                rows, weight_c, bias_c, local_labels(flat_labels, vocab_start, width), blocks, temperature, softcap
            )
            mine = shift_argmax(mine, vocab_start)
        else:
            mine = _neutral(num_rows)
        slots[comm.rank] = np.stack([np.asarray(field, dtype=np.float64) for field in mine])
    except Exception as error:
        failure = error
    sum_with_failures(comm, gathered, failure, "computing its statistics")
    parts = [
        TokenRowStats(*(slots[rank, k] for k in range(_FIELDS - 1)), slots[rank, -1].astype(np.int64))
        for rank in range(comm.size)
    ]
    merged = merge_token_stats(parts)
    values = finish_token_stats(merged, flat_labels)
    dtype = checks.loss_dtype(hidden.dtype)
    shaped = TokenStats(*(v.reshape(lead_shape).astype(dtype) for v in values[:3]), values.argmax.reshape(lead_shape))
    return TokenForward(shaped, merged, flat_labels, -1, temperature, softcap)


def sharded_token_backward(
    comm: Communicator,
    setup: Any,
    hidden: Any,
    weight: Any,
    bias: Any,
    forward: TokenForward,
    grad_logprob: Any,
    grad_entropy: Any,
    grad_lse: Any,
    *,
    vocab_start: int,
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
    local_error: Optional[Exception],
) -> Tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """(d hidden, identical on every rank; d weight and d bias of this rank's slice) of
    sum(a logprob + b entropy + c lse), from the ``forward`` of the same arrays; None where
    not wanted."""
    width = 0 if local_error is not None else int(weight.shape[0])
    lead_shape = tuple(np.shape(forward.values.logprob))
    num_rows = int(np.prod(lead_shape, dtype=np.int64))
    prepared, local_error = _prepare(setup, hidden, weight, bias, width, local_error)
    _agree_on_arguments(comm, vocab_start, width, local_error)
    rows, weight_c, bias_c, launcher, blocks, temperature, softcap = prepared
    labels, a, b, c = upstream_rows(forward.labels, grad_logprob, grad_entropy, grad_lse, lead_shape, np)
    # Rows swept as ELSEWHERE stay so on every slice; the others take the slice's offsets.
    slice_labels = np.where(labels == ELSEWHERE, ELSEWHERE, local_labels(labels, vocab_start, width))
    features = rows.shape[-1]
    reduced = np.zeros(num_rows * features + 1, dtype=compute_dtype(rows.dtype))
    failure: Optional[BaseException] = None
    grad_weight = grad_bias = None
    try:
        if width:
            grad_hidden, grad_weight, grad_bias = launcher.linear_token_grads(
                rows, weight_c, bias_c, slice_labels, forward.stats, a, b, c, blocks, temperature, softcap,
                want_hidden=want_hidden, want_weight=want_weight, want_bias=want_bias and bias is not None,
            )  # fmt: skip
            if grad_hidden is not None:
                reduced[:-1] = grad_hidden.reshape(-1)
        else:
            grad_weight = np.zeros(np.shape(weight), dtype=rows.dtype) if want_weight else None
            grad_bias = None if not want_bias or bias is None else np.zeros(0, dtype=rows.dtype)
    except Exception as error:
        failure = error
    # d hidden's reduction carries the failures; without it one value does.
    sum_with_failures(comm, reduced if want_hidden else np.zeros(1), failure, "computing its gradients")
    grad_hidden = reduced[:-1].reshape(np.shape(hidden)).astype(hidden.dtype, copy=False) if want_hidden else None
    return grad_hidden, grad_weight, grad_bias
