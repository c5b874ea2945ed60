"""Plain NumPy float64 reference of everything fastxent computes: the oracle for tests and bench.

Readable rather than fast: it builds N x C temporaries and computes in float64 whatever the input
dtype. It imports nothing else of fastxent, so it stays an independent check of the kernels.
The formulas are those of SEMANTICS (see the README's semantics table).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

KERAS_EPSILON = 1e-7
REDUCTIONS = ("none", "sum", "mean", "sum_over_batch_size")


def _clip_bounds(dtype):
    """Keras' [1e-7, 1 - 1e-7], rounded as the kernels compute: float64 for float64, else float32."""
    bound_type = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return float(bound_type(KERAS_EPSILON)), float(bound_type(1 - KERAS_EPSILON))


def _to_rows(logits, labels, axis):
    x = np.moveaxis(np.asarray(logits).astype(np.float64), axis, -1)
    lead_shape = x.shape[:-1]
    return x.reshape(-1, x.shape[-1]), np.asarray(labels).reshape(-1).astype(np.int64), lead_shape


def _per_row_terms(x, y, valid, from_logits, label_smoothing, class_weight, z_loss, softcap, clip_bounds):
    """Per-row loss (before the sample weight) and its gradient w.r.t. the input, in float64."""
    num_rows, num_classes = x.shape
    w = np.ones(num_classes) if class_weight is None else np.asarray(class_weight, np.float64)
    safe_y = np.where(valid, y, 0)
    rows = np.arange(num_rows)
    with np.errstate(all="ignore"):
        if from_logits:
            v = x if softcap is None else softcap * np.tanh(x / softcap)
            dv_dx = np.ones_like(x) if softcap is None else 1.0 - (v / softcap) ** 2
        else:
            low, high = clip_bounds
            clipped = np.where(np.isnan(x), np.nan, np.clip(x, low, high))
            v = np.log(clipped)
            inside = (x >= low) & (x <= high)
            dv_dx = np.where(inside, 1.0 / clipped, 0.0)
        row_max = np.max(v, axis=1, keepdims=True)
        safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
        shifted = v - safe_max
        log_sum = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
        # NaN anywhere, +inf anywhere, or every class -inf: the row is NaN (as TF and PyTorch).
        bad = (np.isnan(v).any(axis=1) | np.isposinf(v).any(axis=1) | np.isneginf(v).all(axis=1))[:, None]
        log_sum = np.where(bad, np.nan, log_sum)
        lse = (safe_max + log_sum)[:, 0]
        # v_c - lse as (v_c - max) - log(sum): exact for logits of magnitude 1e30, where
        # lse - v_c would lose everything to cancellation.
        log_softmax = shifted - log_sum
        softmax = np.exp(log_softmax)
        w_y = w[safe_y]
        eps = label_smoothing
        total_w = w.sum()
        loss = w_y * (1 - eps) * -log_softmax[rows, safe_y]
        if eps:
            loss = loss - eps / num_classes * (log_softmax * w).sum(axis=1)
        if z_loss:
            loss = loss + z_loss * w_y * lse**2
        grad_v = softmax * (w_y * (1 - eps) + eps * total_w / num_classes + 2 * z_loss * w_y * lse)[:, None]
        grad_v -= eps / num_classes * w[None, :]
        grad_v[rows, safe_y] -= w_y * (1 - eps)
        grad = grad_v * dv_dx
    return loss, grad, w_y


def sparse_cross_entropy_with_grad(
    logits,
    labels,
    *,
    from_logits: bool = True,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    class_weight=None,
    sample_weight=None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    axis: int = -1,
) -> Tuple[np.ndarray, np.ndarray]:
    """Float64 loss and gradient d(loss)/d(logits); same arguments as ``fastxent``'s function.

    Returns (loss: float64, 0-d for "sum"/"mean"/"sum_over_batch_size" or labels-shaped for
    "none"; grad: float64 with the logits' shape).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}")
    x, y, lead_shape = _to_rows(logits, labels, axis)
    valid = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    sw = (
        np.ones(y.shape)
        if sample_weight is None
        else np.broadcast_to(np.asarray(sample_weight, np.float64), lead_shape).reshape(-1)
    )
    loss, grad, w_y = _per_row_terms(
        x, y, valid, from_logits, label_smoothing, class_weight, z_loss, softcap, _clip_bounds(np.asarray(logits).dtype)
    )
    with np.errstate(all="ignore"):
        loss = np.where(valid, loss * sw, 0.0)
        grad = np.where(valid[:, None], grad * sw[:, None], 0.0)
        if reduction == "none":
            scale, total = 1.0, loss.reshape(lead_shape)
        else:
            if reduction == "sum":
                denominator = 1.0
            elif reduction == "mean":
                denominator = float(np.sum(np.where(valid, sw * w_y, 0.0)))
            else:
                denominator = float(np.count_nonzero(valid))
            if denominator == 0.0:
                scale, total = 0.0, np.array(0.0)
            else:
                scale, total = 1.0 / denominator, np.array(loss.sum() / denominator)
        grad = np.where(valid[:, None], grad * scale, 0.0)
    grad = np.moveaxis(grad.reshape(lead_shape + (x.shape[1],)), -1, axis)
    return np.asarray(total, np.float64), grad


def sparse_cross_entropy(logits, labels, **options) -> np.ndarray:
    """Float64 loss only; see ``sparse_cross_entropy_with_grad``."""
    return sparse_cross_entropy_with_grad(logits, labels, **options)[0]


def log_softmax_gather(logits, labels, *, axis: int = -1) -> np.ndarray:
    """Float64 log p(label) per row: x_y - logsumexp(x), labels-shaped."""
    return -sparse_cross_entropy(logits, labels, reduction="none", axis=axis)


# ----------------------------------------------------------------------------------------
# Dense targets (one-hot or soft label rows)
# ----------------------------------------------------------------------------------------


def _dense_per_row_terms(x, mass, from_logits, clip_bounds):
    """Per-row loss sum_c a_c (lse - x_c) (or -sum_c a_c log clip(q_c)) and its gradient, float64."""
    with np.errstate(all="ignore"):
        if from_logits:
            row_max = np.max(x, axis=1, keepdims=True)
            safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
            shifted = x - safe_max
            log_sum = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
            bad = (np.isnan(x).any(axis=1) | np.isposinf(x).any(axis=1) | np.isneginf(x).all(axis=1))[:, None]
            log_sum = np.where(bad, np.nan, log_sum)
            log_softmax = shifted - log_sum
            # A class with no target mass contributes 0, also where its logit is -inf.
            loss = -np.sum(np.where(mass != 0, mass * log_softmax, 0.0), axis=1)
            grad = mass.sum(axis=1, keepdims=True) * np.exp(log_softmax) - mass
        else:
            low, high = clip_bounds
            row_sum = x.sum(axis=1, keepdims=True)
            normalised = x / row_sum
            clipped = np.clip(normalised, low, high)
            loss = -np.sum(np.where(mass != 0, mass * np.log(clipped), 0.0), axis=1)
            inside = (normalised >= low) & (normalised <= high)
            slope = np.where(inside, -mass / clipped, 0.0)
            grad = (slope - np.sum(slope * normalised, axis=1, keepdims=True)) / row_sum
    return loss, grad


def categorical_cross_entropy_with_grad(
    logits,
    targets,
    *,
    from_logits: bool = True,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    class_weight=None,
    sample_weight=None,
    axis: int = -1,
) -> Tuple[np.ndarray, np.ndarray]:
    """Float64 loss and gradient for dense target rows; same arguments as ``fastxent``'s function.

    Per row, with ``a_c = w_c ((1 - eps) t_c + eps / C)``: ``sum_c a_c (lse - x_c)`` for logits,
    ``-sum_c a_c log clip(p_c / sum p)`` for probabilities (Keras). Reductions: "none" (per-row
    ``s_i loss_i``), "sum", "mean" (divided by the sum of the sample weights, N without them,
    as PyTorch does for probability targets), "sum_over_batch_size" (divided by N).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}")
    dtype = np.asarray(logits).dtype
    x = np.moveaxis(np.asarray(logits).astype(np.float64), axis, -1)
    lead_shape, num_classes = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, num_classes)
    t = np.moveaxis(np.asarray(targets).astype(np.float64), axis, -1).reshape(-1, num_classes)
    num_rows = x.shape[0]
    w = np.ones(num_classes) if class_weight is None else np.asarray(class_weight, np.float64)
    mass = w * ((1.0 - label_smoothing) * t + label_smoothing / num_classes)
    sw = (
        np.ones(num_rows)
        if sample_weight is None
        else np.broadcast_to(np.asarray(sample_weight, np.float64), lead_shape).reshape(-1)
    )
    loss, grad = _dense_per_row_terms(x, mass, from_logits, _clip_bounds(dtype))
    with np.errstate(all="ignore"):
        loss = loss * sw
        if reduction == "none":
            scale, total = 1.0, loss.reshape(lead_shape)
        else:
            denominator = {"sum": 1.0, "mean": float(sw.sum()), "sum_over_batch_size": float(num_rows)}[reduction]
            if denominator == 0.0:
                scale, total = 0.0, np.array(0.0)
            else:
                scale, total = 1.0 / denominator, np.array(loss.sum() / denominator)
        grad = grad * (sw * scale)[:, None]
    grad = np.moveaxis(grad.reshape(lead_shape + (num_classes,)), -1, axis)
    return np.asarray(total, np.float64), grad


def categorical_cross_entropy(logits, targets, **options) -> np.ndarray:
    """Float64 loss only; see ``categorical_cross_entropy_with_grad``."""
    return categorical_cross_entropy_with_grad(logits, targets, **options)[0]


# ----------------------------------------------------------------------------------------
# Linear layer + cross-entropy (the unfused float64 composition)
# ----------------------------------------------------------------------------------------


def linear_cross_entropy_with_grad(hidden, weight, labels, *, bias=None, **options):
    """Float64 loss and gradients of ``sparse_cross_entropy(hidden @ weight.T + bias, labels)``.

    hidden (..., H), weight (V, H), bias (V,) or None; ``options`` as the sparse function's
    (from_logits and axis excepted). Returns (loss, grad_hidden (..., H), grad_weight (V, H),
    grad_bias (V,) or None), float64.
    """
    h = np.asarray(hidden).astype(np.float64)
    w = np.asarray(weight).astype(np.float64)
    rows = h.reshape(-1, h.shape[-1])
    logits = rows @ w.T
    if bias is not None:
        logits = logits + np.asarray(bias).astype(np.float64)
    flat_labels = np.asarray(labels).reshape(-1)
    sample_weight = options.pop("sample_weight", None)
    if sample_weight is not None:
        lead_shape = np.asarray(labels).shape
        sample_weight = np.broadcast_to(np.asarray(sample_weight, np.float64), lead_shape).reshape(-1)
    loss, grad = sparse_cross_entropy_with_grad(logits, flat_labels, sample_weight=sample_weight, **options)
    if options.get("reduction") == "none":
        loss = loss.reshape(np.asarray(labels).shape)
    grad_hidden = (grad @ w).reshape(h.shape)
    grad_bias = None if bias is None else grad.sum(axis=0)
    return loss, grad_hidden, grad.T @ rows, grad_bias


def linear_cross_entropy(hidden, weight, labels, **options) -> np.ndarray:
    """Float64 loss only; see ``linear_cross_entropy_with_grad``."""
    return linear_cross_entropy_with_grad(hidden, weight, labels, **options)[0]


# ----------------------------------------------------------------------------------------
# Per-token statistics (log-probability, entropy, logsumexp, argmax) and their gradient
# ----------------------------------------------------------------------------------------


def token_stats_with_grad(
    logits,
    labels,
    grad_logprob=None,
    grad_entropy=None,
    grad_lse=None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: Optional[int] = None,
    axis: int = -1,
):
    """Float64 ``(logprob, entropy, lse, argmax)`` per row and the gradient of
    ``sum(grad_logprob * logprob + grad_entropy * entropy + grad_lse * lse)`` w.r.t. the logits.

    With z = softcap(x) / temperature: lse = log sum exp z, logprob = z_y - lse, entropy =
    lse - sum softmax(z) z (a class of z = -inf adds 0), argmax = the first index of max x
    (the first NaN where there is one). Rows whose label is ``ignore_index``: logprob 0,
    entropy 0 and no gradient from them (lse and argmax as for any row). The upstream gradients
    are labels-shaped (or broadcastable), None for 0. Returns ((logprob, entropy, lse float64, argmax int64), each
    labels-shaped; gradient float64 with the logits' shape).
    """
    x, y, lead_shape = _to_rows(logits, labels, axis)
    num_rows, num_classes = x.shape
    counted = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    safe_y = np.where(counted, y, 0)
    rows = np.arange(num_rows)

    def per_row(values):
        if values is None:
            return np.zeros(num_rows)
        return np.broadcast_to(np.asarray(values, np.float64), lead_shape).reshape(-1)

    a, b, c = per_row(grad_logprob), per_row(grad_entropy), per_row(grad_lse)
    a, b = np.where(counted, a, 0.0), np.where(counted, b, 0.0)
    with np.errstate(all="ignore"):
        v = x if softcap is None else softcap * np.tanh(x / softcap)
        dv_dx = np.ones_like(x) if softcap is None else 1.0 - (v / softcap) ** 2
        z = v / temperature
        row_max = np.max(z, axis=1, keepdims=True) if num_classes else np.zeros((num_rows, 1))
        safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
        shifted = z - safe_max
        log_sum = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
        bad = (np.isnan(z).any(axis=1) | np.isposinf(z).any(axis=1))[:, None]
        log_sum = np.where(bad, np.nan, log_sum)
        lse = (safe_max + log_sum)[:, 0]
        p = np.exp(shifted - log_sum)
        # p z with p = 0 where z = -inf: the masked class adds nothing (0 * -inf would be NaN).
        centred = np.where(p > 0, shifted, 0.0)
        mean_shift = np.sum(p * centred, axis=1)  # sum p (z - max) = sum p z - max
        entropy = log_sum[:, 0] - mean_shift
        logprob = shifted[rows, safe_y] - log_sum[:, 0]
        # d/dz_j of a logprob + b entropy + c lse = a([j=y] - p_j) + b p_j (sum p z - z_j) + c p_j.
        grad_z = p * (b[:, None] * (mean_shift[:, None] - centred) - a[:, None] + c[:, None])
        grad_z[rows, safe_y] += a
        grad = np.where((counted | (c != 0))[:, None], grad_z * dv_dx / temperature, 0.0)
        everything_masked = np.isneginf(z).all(axis=1) if num_classes else np.zeros(num_rows, bool)
        entropy = np.where(everything_masked, np.nan, entropy)
    nan_rows = np.isnan(x).any(axis=1)
    argmax = np.where(nan_rows, np.argmax(np.isnan(x), axis=1), np.argmax(np.where(np.isnan(x), 0, x), axis=1))
    logprob = np.where(counted, logprob, 0.0)
    entropy = np.where(counted, entropy, 0.0)
    shape = lambda values: values.reshape(lead_shape)  # noqa: E731
    grad = np.moveaxis(grad.reshape(lead_shape + (num_classes,)), -1, axis)
    return (shape(logprob), shape(entropy), shape(lse), shape(argmax.astype(np.int64))), grad


def token_stats(logits, labels, **options):
    """Float64 ``(logprob, entropy, lse, argmax)``; see ``token_stats_with_grad``."""
    return token_stats_with_grad(logits, labels, **options)[0]
