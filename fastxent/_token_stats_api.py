"""Per-token statistics: log-probability, entropy, logsumexp and argmax of every row in one
sweep, and the gradient of any a logprob + b entropy in one more.

Validation and dispatch by array type, as ``fastxent._api``: NumPy arrays run the Numba kernels
(``fastxent.cpu.stats``), CuPy arrays the CUDA kernels (``fastxent.gpu.stats``). Both hand their
statistics to the range layer of ``fastxent._token_range`` for the float64 epilogue.

``token_stats_forward`` and ``token_stats_backward`` split a call in two for the autograd
adapters (the forward's saved statistics are what the backward needs: the row max, the sum of
exps and the entropy's accumulator, float64 per row).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Tuple

from fastxent import _checks as checks
from fastxent._api import prepare_targets
from fastxent._range import ELSEWHERE, IGNORED
from fastxent._token_range import TokenRowStats, finish_token_stats

__all__ = [
    "TokenStats",
    "TokenForward",
    "check_temperature",
    "token_stats",
    "token_stats_backward",
    "token_stats_forward",
    "token_stats_with_grad",
    "upstream_rows",
]


class TokenStats(NamedTuple):
    """Per-token statistics, each with the labels' shape.

    Attributes:
        logprob: log softmax(z)[label], z = softcap(logits) / temperature; 0 for ignored rows.
        entropy: -sum softmax(z) log softmax(z); 0 for ignored rows.
        lse: log sum exp z (every row, ignored ones too).
        argmax: int64, the index of the largest logit, the lowest on ties (the first NaN in a
            row that has one).

    logprob, entropy and lse are float32 for 16- and 32-bit logits, float64 for float64.
    """

    logprob: Any
    entropy: Any
    lse: Any
    argmax: Any


class TokenForward(NamedTuple):
    """A forward call's results and what its backward needs."""

    values: TokenStats
    stats: TokenRowStats  # float64 (N,) per row, on the logits' device
    labels: Any  # int64 (N,), -1 for ignored rows
    axis: int  # the class axis, normalised
    temperature: float
    softcap: Optional[float]


def check_temperature(temperature: Any) -> float:
    """The temperature as a float; ValueError unless it is a finite number > 0."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    return float(temperature)


def launcher_for(backend: checks.Backend):
    """The token-statistics launcher module of a backend."""
    if backend.name == "cpu":
        from fastxent.cpu import stats
    else:
        from fastxent.gpu import stats
    return stats


def _prepare(logits, labels, temperature, softcap, ignore_index, axis):
    """(backend, logits, rows (N, C), labels int64 (N,), lead shape, axis, temperature, softcap)."""
    checks.check_options(True, "none", 0.0, ignore_index=ignore_index, softcap=softcap)
    temperature = check_temperature(temperature)
    backend = checks.backend_for(logits)
    xp, logits = checks.as_logits(logits, backend)
    axis = checks.normalise_axis(axis, logits.ndim)
    num_classes = checks.check_num_classes(logits, axis)
    lead_shape = checks.lead_shape_of(logits.shape, axis)
    labels = checks.check_labels(labels, xp, lead_shape)
    flat_labels, *_ = prepare_targets(
        labels,
        num_classes,
        xp,
        from_logits=True,
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=0.0,
        class_weight=None,
        sample_weight=None,
        z_loss=0.0,
        softcap=softcap,
    )
    rows = checks.rows_view(logits, axis, xp)
    return (
        backend,
        logits,
        rows,
        flat_labels,
        lead_shape,
        axis,
        temperature,
        None if softcap is None else float(softcap),
    )


def _shaped(values, lead_shape: Tuple[int, ...], dtype) -> TokenStats:
    return TokenStats(
        values.logprob.reshape(lead_shape).astype(dtype),
        values.entropy.reshape(lead_shape).astype(dtype),
        values.lse.reshape(lead_shape).astype(dtype),
        values.argmax.reshape(lead_shape),
    )


def token_stats_forward(
    logits: Any,
    labels: Any,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    axis: int = -1,
) -> TokenForward:
    """``token_stats`` and the per-row statistics ``token_stats_backward`` takes."""
    with checks.device_scope(logits):
        backend, logits, rows, flat_labels, lead_shape, axis, temperature, softcap = _prepare(
            logits, labels, temperature, softcap, ignore_index, axis
        )
        stats = launcher_for(backend).token_row_stats(rows, flat_labels, temperature, softcap)
        values = finish_token_stats(stats, flat_labels, backend.xp)
        shaped = _shaped(values, lead_shape, checks.loss_dtype(logits.dtype))
        return TokenForward(shaped, stats, flat_labels, axis, temperature, softcap)


def _per_row(values: Any, lead_shape: Tuple[int, ...], xp: Any, name: str):
    """float64 (N,) of a labels-shaped (or broadcastable) upstream gradient; None is 0."""
    num_rows = math.prod(lead_shape)
    if values is None:
        return xp.zeros(num_rows)
    values = xp.asarray(values, dtype=xp.float64)
    try:
        return xp.ascontiguousarray(xp.broadcast_to(values, lead_shape).reshape(num_rows))
    except ValueError:
        message = f"{name} of shape {tuple(values.shape)} does not broadcast to the labels' shape {lead_shape}"
        raise ValueError(message) from None


def upstream_rows(labels: Any, grad_logprob: Any, grad_entropy: Any, grad_lse: Any, lead_shape, xp: Any):
    """(labels, a, b, c) for the gradient kernels from labels-shaped (or broadcastable)
    upstream gradients (None: 0), a, b, c float64 (N,). An ignored row's lse still has a
    gradient: where it is not 0 the row is swept as one whose target lies elsewhere (ELSEWHERE),
    with a = b = 0."""
    a = _per_row(grad_logprob, lead_shape, xp, "grad_logprob")
    b = _per_row(grad_entropy, lead_shape, xp, "grad_entropy")
    c = _per_row(grad_lse, lead_shape, xp, "grad_lse")
    if grad_lse is not None:
        ignored = labels == IGNORED
        a, b = xp.where(ignored, 0.0, a), xp.where(ignored, 0.0, b)
        labels = xp.where(ignored & (c != 0.0), ELSEWHERE, labels)
    return labels, a, b, c


def token_stats_backward(
    logits: Any,
    forward: TokenForward,
    grad_logprob: Any,
    grad_entropy: Any,
    grad_lse: Any = None,
    *,
    out: Any = None,
) -> Any:
    """The gradient of sum(grad_logprob * logprob + grad_entropy * entropy + grad_lse * lse)
    w.r.t. ``logits`` (their shape and dtype), one sweep, from the ``forward`` of the same
    logits.

    The upstream gradients are labels-shaped (or broadcastable), None for 0. Ignored rows have
    no logprob or entropy gradient (their lse has its own). ``out``: an array like the logits'
    rows (N, C) to write into.
    """
    with checks.device_scope(logits):
        backend = checks.backend_for(logits)
        xp, logits = checks.as_logits(logits, backend)
        axis = forward.axis
        lead_shape = checks.lead_shape_of(logits.shape, axis)
        rows = checks.rows_view(logits, axis, xp)
        labels, a, b, c = upstream_rows(forward.labels, grad_logprob, grad_entropy, grad_lse, lead_shape, xp)
        grad_rows = launcher_for(backend).token_grad(
            rows, labels, forward.stats, a, b, c, forward.temperature, forward.softcap, out=out
        )
        return checks.grad_like(grad_rows, lead_shape, axis, xp)


def token_stats(
    logits: Any,
    labels: Any,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    axis: int = -1,
) -> TokenStats:
    """Log-probability of the label, entropy, logsumexp and argmax of every row, in one sweep.

    With z = softcap(logits) / temperature (softcap s: s tanh(x / s), applied first):
    ``lse = log sum exp z``, ``logprob = z_label - lse``, ``entropy = lse - sum softmax(z) z``,
    ``argmax`` = the index of the largest logit (lowest on ties). ``-inf`` logits are masked
    classes: probability 0, adding 0 to the entropy.

    Args:
        logits: float16/bfloat16/float32/float64, shape (..., C, ...) with the classes on
            ``axis``; NumPy (CPU) or CuPy (GPU).
        labels: integer class indices, the logits' shape without the class axis.
        temperature: a finite number > 0 dividing the (softcapped) logits.
        softcap: s, or None.
        ignore_index: a label value whose rows get logprob 0 and entropy 0 (and no gradient);
            their lse and argmax are computed as for any row.
        axis: the class axis.

    Returns:
        ``TokenStats(logprob, entropy, lse, argmax)``, each labels-shaped: float32 (float64 for
        float64 logits), argmax int64. A row with NaN, or +inf without a softcap, gives NaN;
        a row whose classes are all -inf has lse -inf and NaN logprob and entropy.
    """
    return token_stats_forward(
        logits, labels, temperature=temperature, softcap=softcap, ignore_index=ignore_index, axis=axis
    ).values


def token_stats_with_grad(
    logits: Any,
    labels: Any,
    grad_logprob: Any = 1.0,
    grad_entropy: Any = 0.0,
    grad_lse: Any = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    axis: int = -1,
) -> Tuple[TokenStats, Any]:
    """``token_stats`` and the gradient of sum(grad_logprob * logprob + grad_entropy * entropy
    + grad_lse * lse) w.r.t. the logits (their shape and dtype), one more sweep.

    ``grad_logprob``, ``grad_entropy``, ``grad_lse``: per-row coefficients a, b, c,
    labels-shaped or broadcastable (scalars: every row alike; None: 0). The gradient is, per
    class j, ``(a([j=y] - p_j) + b p_j (sum_c p_c z_c - z_j) + c p_j) / temperature`` times the
    softcap's derivative; ignored rows have a = b = 0. Other arguments as ``token_stats``.
    """
    forward = token_stats_forward(
        logits, labels, temperature=temperature, softcap=softcap, ignore_index=ignore_index, axis=axis
    )
    grad = token_stats_backward(logits, forward, grad_logprob, grad_entropy, grad_lse)
    return forward.values, grad
