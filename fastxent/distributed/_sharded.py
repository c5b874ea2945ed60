"""Vocabulary-parallel cross-entropy: each rank holds one class range of every row.

The logits never move. Each rank computes the partial statistics of its class range with the
core kernel (``fastxent.cpu.partial.range_stats``), and two all-reductions of per-row numbers
make them global:

1. MAX (float32; float64 for float64 logits), N + 11 values:
       per row   the row max of this range (probabilities: minus the row min, for the
                 negative-input check; their row max is always 0)
       per call  an argument-error flag, a "layout not verified yet" flag, the believed total
                 class count, a fingerprint of labels / sample weights / options (each also
                 negated, so one MAX tells whether every rank holds the same value), and a
                 bad-label flag
2. SUM (same dtype):
       per row   sum_exp rescaled to the global max (probabilities: the clipped sum); the
                 target's value relative to the global max, d = v_y - max, from the rank that
                 owns the target (probabilities: log clip(p_y)), or with label smoothing
                 A = (1 - eps) w_y d + eps / V sum_c w_c (v_c - max), to which every rank adds
                 its share; [with class weights] the target's class weight
       per call  [with class weights and label smoothing] this shard's sum of class weights

That is 12 bytes per row per rank for float32 logits, label smoothing included, and 16 with
class weights. From the global statistics every rank computes the same per-row losses
(``finish_rows``) and reduction, and the gradient of its own slice (``range_grad``, with the
owner's exact local target value), without further communication.

The shard layout (vocab_start, width per rank) is checked once per group by an all-gather, the
first time a rank sees a new layout; the "not verified" flag of collective 1 makes every rank
join that all-gather together, so a layout that changes on some ranks only cannot deadlock.
Errors that depend on data (a bad label, a negative probability, a broken tiling, an argument
that only one rank gets wrong, ranks passing different labels) are decided from the results of
a collective, so every rank raises and none is left waiting.
"""

from __future__ import annotations

import numbers
import zlib
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional

import numpy as np

from fastxent import _api
from fastxent._options import KernelOptions
from fastxent.cpu import partial
from fastxent.distributed._comm import Communicator

# Layout of the per-call tail of the MAX buffer (float32 holds integers exactly below 2**24, so
# wider integers travel as 24-bit chunks).
_ERROR_RANK = 0  # 1 + the highest rank whose arguments were rejected, 0 if none
_UNVERIFIED = 1  # 1 if this rank's shard layout has not been checked yet
_TOTAL = slice(2, 4)  # believed total class count (two 24-bit chunks), -1 if unknown
_NEG_TOTAL = slice(4, 6)
_PRINT = slice(6, 8)  # fingerprint of labels, sample weights and options (two 16-bit chunks)
_NEG_PRINT = slice(8, 10)
_BAD_LABEL = 10  # 1 if this rank found a label outside [0, V)
TAIL = 11

PROB_EPS = np.float32(1e-7)
PROB_ONE_MINUS_EPS = np.float32(1.0 - 1e-7)


@dataclass(frozen=True)
class ShardLayout:
    """This rank's class range [vocab_start, vocab_start + width) of num_classes in all."""

    vocab_start: int
    width: int
    num_classes: int


def cached_layout(comm: Communicator, vocab_start: int, width: int) -> Optional[ShardLayout]:
    """This rank's last verified layout in ``comm``'s group, if it is still (vocab_start, width).

    Kept on the adapter, of which there is one per group (``communicator_for``).
    """
    layout = getattr(comm, "verified_layout", None)
    return layout if layout is not None and (layout.vocab_start, layout.width) == (vocab_start, width) else None


def check_tiling(comm: Communicator, vocab_start: int, width: int) -> ShardLayout:
    """All-gather every rank's (vocab_start, width); raise on every rank unless they tile [0, V)."""
    table = comm.allgather_ints((vocab_start, width))
    problems = []
    for rank, (start, _) in enumerate(table):
        if start < 0:
            problems.append(f"rank {rank} has a negative vocab_start={int(start)}")
    holding = sorted((int(start), int(size), rank) for rank, (start, size) in enumerate(table) if size > 0)
    covered, previous = 0, None
    for start, size, rank in holding:
        if start > covered:
            after = "" if previous is None else f" (rank {previous[2]} ends at {covered})"
            problems.append(f"classes [{covered}, {start}) belong to no rank: rank {rank} starts at {start}{after}")
        elif start < covered and previous is not None:
            problems.append(
                f"rank {rank} holds [{start}, {start + size}), which overlaps rank {previous[2]}'s "
                f"[{previous[0]}, {previous[0] + previous[1]})"
            )
        if start + size >= covered:
            covered, previous = start + size, (start, size, rank)
    if covered == 0 and not problems:
        problems.append("no rank holds any class")
    if problems:
        listing = ", ".join(f"rank {r}: [{int(s)}, {int(s + w)})" for r, (s, w) in enumerate(table[:16]))
        more = "" if len(table) <= 16 else f", ... ({len(table)} ranks)"
        raise ValueError(
            "the vocabulary shards do not tile [0, V) without gap or overlap: "
            + "; ".join(problems)
            + f". Shards: {listing}{more}"
        )
    layout = ShardLayout(vocab_start, width, covered)
    comm.verified_layout = layout
    return layout


def _chunks(value: int, count: int, bits: int) -> list:
    """Non-negative ``value`` as ``count`` integers of ``bits`` bits, most significant first."""
    mask = (1 << bits) - 1
    return [float((value >> (bits * (count - 1 - k))) & mask) for k in range(count)]


def _all_equal(buffer: np.ndarray, values: slice, negated: slice) -> bool:
    """After a MAX of (x, -x): every rank held the same x exactly when max(x) == -max(-x)."""
    return bool(np.array_equal(buffer[values], -buffer[negated]))


class Settings(NamedTuple):
    """The options every rank must pass identically (checked by the fingerprint)."""

    from_logits: bool
    reduction: str
    ignore_index: Optional[int]
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def check_settings(from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap, vocab_start) -> Settings:
    """The core API's option checks, plus vocab_start's type (identical on every rank: raised locally)."""
    _api._check_options(from_logits, reduction, ignore_index, label_smoothing, z_loss, softcap)
    if not isinstance(vocab_start, numbers.Integral) or isinstance(vocab_start, (bool, np.bool_)):
        raise TypeError(f"vocab_start must be an integer (this shard's first global class); got {vocab_start!r}")
    return Settings(
        bool(from_logits),
        reduction,
        None if ignore_index is None else int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
    )


def check_labels(labels: Any) -> np.ndarray:
    """Labels as an integer NumPy array (identical on every rank: raised locally)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (global class indices); got dtype {labels.dtype}")
    return labels


def row_weights(sample_weight: Any, lead_shape: tuple) -> np.ndarray:
    """float64 (N,) sample weight per row (identical on every rank: raised locally)."""
    num_rows = int(np.prod(lead_shape, dtype=np.int64))
    if sample_weight is None:
        return np.ones(num_rows)
    sample = np.asarray(sample_weight, dtype=np.float64)
    try:
        return np.ascontiguousarray(np.broadcast_to(sample, lead_shape).reshape(-1))
    except ValueError:
        raise ValueError(
            f"sample_weight shape {tuple(sample.shape)} does not broadcast to the labels shape {lead_shape}"
        ) from None


def local_class_weight(class_weight: Any, width: int) -> Optional[np.ndarray]:
    """This shard's (width,) class weights as float64, or None (may differ by rank: deferred)."""
    if class_weight is None:
        return None
    weights = np.ascontiguousarray(np.asarray(class_weight, dtype=np.float64))
    if weights.shape != (width,):
        raise ValueError(
            f"class_weight must hold this shard's weights, one per local class, shape ({width},); "
            f"got {tuple(weights.shape)}"
        )
    return weights


class NumpyKernel:
    """The core Numba kernels over NumPy rows (N, W): statistics, then the gradient."""

    @staticmethod
    def _bounds(rows: np.ndarray) -> Optional[np.ndarray]:
        from fastxent.cpu import xent

        num_rows, width = rows.shape
        if num_rows and xent.use_split_rows(num_rows, width):
            return xent.part_bounds_for(num_rows, width)
        return None

    def stats(self, rows, labels, options: KernelOptions) -> partial.RowStats:
        return partial.range_stats(rows, labels, options, self._bounds(rows))

    def grad(self, rows, labels, stats, coefs, target_weight, options, *, inplace: bool):
        return partial.range_grad(
            rows, labels, stats, coefs, target_weight, options, inplace=inplace, part_bounds=self._bounds(rows)
        )


def _neutral_stats(num_rows: int) -> partial.RowStats:
    zeros = np.zeros(num_rows)
    return partial.RowStats(np.full(num_rows, -np.inf), zeros, zeros, zeros, zeros, np.full(num_rows, np.inf))


def _fingerprint(
    labels: np.ndarray,
    sample_weight: Optional[np.ndarray],
    settings: Settings,
    has_class_weight: bool,
    comm_dtype: np.dtype,
) -> int:
    digest = zlib.crc32(repr((labels.shape, tuple(settings), has_class_weight, comm_dtype.name)).encode())
    digest = zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes(), digest)
    if sample_weight is not None:
        digest = zlib.crc32(np.ascontiguousarray(sample_weight, dtype=np.float64).tobytes(), digest)
    return digest


def _bad_label_message(position, value, num_classes, ignore_index) -> str:
    hint = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
    return (
        f"label {value} at position {position} is outside the valid range [0, {num_classes}) of the "
        f"whole (sharded) vocabulary{hint}"
    )


@dataclass
class ShardedForward:
    """Everything the gradient of this rank's slice needs after the forward collectives."""

    loss: np.ndarray
    per_row_loss: np.ndarray
    rows: Any
    labels: np.ndarray  # local labels of this range
    stats: partial.RowStats  # global statistics
    coefs: partial.RowCoefficients
    target_weight: np.ndarray
    options: KernelOptions
    kernel: Any
    layout: ShardLayout
    bytes_sent: int
    collectives: int

    def grad(self, *, inplace: bool = False, upstream: Any = None):
        """This slice's gradient (rows' shape and dtype), times ``upstream``: None, a scalar, or
        one factor per row (the incoming gradient of a "none" reduction)."""
        coefs = self.coefs
        if upstream is not None:
            factor = np.asarray(upstream, dtype=np.float64).reshape(-1)
            coefs = partial.RowCoefficients(
                coefs.loss, coefs.coef_p * factor, coefs.coef_t * factor, coefs.coef_w * factor
            )
        return self.kernel.grad(
            self.rows, self.labels, self.stats, coefs, self.target_weight, self.options, inplace=inplace
        )


def sharded_forward(
    comm: Communicator,
    kernel: Any,
    rows: Any,
    *,
    num_rows: int,
    width: int,
    logits_dtype: Any,
    vocab_start: int,
    labels: np.ndarray,
    sample_weight: Any,
    class_weight: Any,
    settings: Settings,
    local_error: Optional[Exception] = None,
) -> ShardedForward:
    """Loss over the whole vocabulary and what this rank's gradient needs, with two collectives.

    Args:
        comm: the group's adapter.
        kernel: ``NumpyKernel`` or another object with the same ``stats``/``grad`` methods.
        rows: this rank's (N, width) logits in the kernel's array type (unused if ``local_error``).
        num_rows, width: N and this shard's class count.
        logits_dtype: the logits' dtype (float64 communicates in float64, anything else float32).
        labels: integer array of global labels, identical on every rank (its shape is the loss's).
        sample_weight: None or broadcastable to ``labels``, identical on every rank.
        class_weight: None or this shard's (width,) class weights.
        settings: the checked options.
        local_error: an error this rank found in its own arguments; every rank raises.
    """
    lead_shape = tuple(labels.shape)
    comm_dtype = np.dtype(np.float64) if np.dtype(logits_dtype) == np.float64 else np.dtype(np.float32)
    row_weight = row_weights(sample_weight, lead_shape)
    weights = None
    if local_error is None:
        try:
            weights = local_class_weight(class_weight, width)
        except ValueError as error:
            local_error = error
    ignore_index = settings.ignore_index
    flat = labels.reshape(-1).astype(np.int64)
    valid = None if ignore_index is None else flat != ignore_index
    flat_labels = flat.copy()
    if valid is not None:
        flat_labels[~valid] = partial.IGNORED
    start, width = int(vocab_start), int(width)
    layout = cached_layout(comm, start, width)
    collectives_before, bytes_before = comm.collectives, comm.bytes_sent

    bad = None
    if layout is not None:
        bad = _api._find_bad_label(labels, None if valid is None else valid.reshape(lead_shape), layout.num_classes, np)
    # Out-of-range labels map to ELSEWHERE here (or IGNORED for -1): harmless, the call raises below.
    local = partial.local_labels(flat_labels, start, width)
    options = KernelOptions(
        from_logits=settings.from_logits,
        label_smoothing=settings.label_smoothing,
        z_loss=settings.z_loss,
        softcap=settings.softcap,
        class_weight=weights,
        class_weight_total=float("nan"),
        num_classes=0 if layout is None else layout.num_classes,
        grad_scale=1.0,
    )
    stats = _neutral_stats(num_rows) if local_error is not None else kernel.stats(rows, local, options)

    # ---- collective 1: MAX ------------------------------------------------------------------
    first = np.empty(num_rows + TAIL, dtype=comm_dtype)
    first[:num_rows] = stats.row_max if settings.from_logits else -stats.row_min
    tail = first[num_rows:]
    tail[_ERROR_RANK] = 0.0 if local_error is None else comm.rank + 1.0
    tail[_UNVERIFIED] = 1.0 if layout is None else 0.0
    total = [-1.0, -1.0] if layout is None else _chunks(layout.num_classes, 2, 24)
    tail[_TOTAL], tail[_NEG_TOTAL] = total, [-t for t in total]
    printed = _chunks(
        _fingerprint(
            labels, None if sample_weight is None else row_weight, settings, class_weight is not None, comm_dtype
        ),
        2,
        16,
    )
    tail[_PRINT], tail[_NEG_PRINT] = printed, [-p for p in printed]
    tail[_BAD_LABEL] = 0.0 if bad is None else 1.0
    comm.allreduce_max(first)

    if tail[_ERROR_RANK] > 0:
        if local_error is not None:
            raise local_error
        raise ValueError(f"rank {int(tail[_ERROR_RANK]) - 1} rejected its arguments (see the error raised there)")
    if not _all_equal(tail, _PRINT, _NEG_PRINT):
        raise ValueError(
            "ranks passed different labels, sample weights or options: they must be identical "
            "on every rank (only the logits and class weights are sharded)"
        )
    if tail[_UNVERIFIED] > 0 or not _all_equal(tail, _TOTAL, _NEG_TOTAL):
        # Every rank takes this branch together: the flags came out of the same MAX.
        layout = check_tiling(comm, start, width)
        # Labels are identical on every rank (fingerprint), so every rank finds the same label.
        bad = _api._find_bad_label(labels, None if valid is None else valid.reshape(lead_shape), layout.num_classes, np)
    elif tail[_BAD_LABEL] > 0 and bad is None:
        raise ValueError(
            f"another rank found a label outside [0, {layout.num_classes}); labels must be identical on every rank"
        )
    if bad is not None:
        raise ValueError(_bad_label_message(*bad, layout.num_classes, ignore_index))
    if not settings.from_logits and num_rows:
        negative = first[:num_rows] > 0
        if bool(negative.any()):
            row = int(np.argmax(negative))
            position = _api._position(row, lead_shape)
            raise ValueError(
                f"from_logits=False expects probabilities, but row {position} has a negative value "
                f"({-float(first[row]):.6g}) in some shard; the input looks like logits: pass from_logits=True"
            )

    # ---- collective 2: SUM ------------------------------------------------------------------
    smoothing = settings.label_smoothing != 0.0
    eps, num_classes = settings.label_smoothing, layout.num_classes
    global_max = first[:num_rows].astype(np.float64) if settings.from_logits else np.zeros(num_rows)
    local_weight_total = float(width) if weights is None else float(weights.sum())
    fields = 2 + int(weights is not None)
    second = np.zeros(fields * num_rows + int(weights is not None and smoothing), dtype=comm_dtype)
    sum_part, target_part = second[:num_rows], second[num_rows : 2 * num_rows]
    counted = flat_labels != partial.IGNORED
    owned = np.flatnonzero(local >= 0)
    local_target_weight = partial.target_weights(local, weights)
    if settings.from_logits:
        sum_part[:] = partial.rescale_sum_exp(stats.row_max, stats.sum_exp, global_max)
    else:
        sum_part[:] = stats.sum_exp
    # The target's value relative to the global max, d = v_y - max (probabilities: log clip(p_y)),
    # from the rank that owns it. With label smoothing the loss needs d only inside
    #     A = (1 - eps) w_y d + eps / V * sum_c w_c (v_c - max),
    # a sum over the ranks like the rest, so A travels in d's place (every rank adds its share
    # of the smoothing sum): label smoothing costs no extra bytes. Relative to the max, because
    # float32 could not resolve a difference next to a large logit.
    with np.errstate(invalid="ignore", over="ignore"):
        relative_target = stats.target_value[owned] - global_max[owned]
        if smoothing:
            relative_sum = stats.weighted_sum - (local_weight_total * global_max if local_weight_total else 0.0)
            share = np.where(counted, eps / num_classes * relative_sum, 0.0)
            share[owned] += (1.0 - eps) * local_target_weight[owned] * relative_target
            target_part[:] = share
        else:
            target_part[owned] = relative_target
    if weights is not None:
        second[2 * num_rows : 3 * num_rows] = local_target_weight
        if smoothing:
            second[3 * num_rows] = local_weight_total
    comm.allreduce_sum(second)

    # ---- finish: global statistics -> per-row loss and gradient coefficients -----------------
    sum_exp = second[:num_rows].astype(np.float64)
    combined = second[num_rows : 2 * num_rows].astype(np.float64)
    weight_total = float(num_classes)
    if weights is not None:
        target_weight = np.where(counted, second[2 * num_rows : 3 * num_rows].astype(np.float64), 0.0)
        if smoothing:
            weight_total = float(second[3 * num_rows])
    else:
        target_weight = np.where(counted, 1.0, 0.0)
    # The epilogue takes (target value, weighted sum); give it values that reproduce A: with
    # smoothing, target value = max and (eps / V)(W max - weighted sum) = -A; without, max + d.
    with np.errstate(invalid="ignore", over="ignore"):
        if smoothing:
            epilogue_target = global_max
            weighted_sum = np.where(counted, weight_total * global_max + combined * (num_classes / eps), 0.0)
        else:
            epilogue_target = global_max + combined
            weighted_sum = np.zeros(num_rows)
    no_min = np.full(num_rows, np.inf)
    merged = partial.RowStats(global_max, sum_exp, epilogue_target, np.zeros(num_rows), weighted_sum, no_min)
    # The gradient at the target is the owner's alone: it uses its exact local values.
    grad_stats = partial.RowStats(global_max, sum_exp, stats.target_value, stats.target_input, weighted_sum, no_min)

    if settings.reduction == "mean":
        denominator = float(np.sum(np.where(counted, row_weight * target_weight, 0.0)))
    elif settings.reduction == "sum_over_batch_size":
        denominator = float(np.count_nonzero(counted))
    else:
        denominator = 1.0
    options = replace(
        options,
        num_classes=layout.num_classes,
        class_weight_total=weight_total,
        grad_scale=0.0 if denominator == 0.0 else 1.0 / denominator,
    )
    coefs = partial.finish_rows(merged, local, target_weight, row_weight, options)
    loss = _api._reduce(
        coefs.loss, settings.reduction, denominator, lead_shape, _api._loss_dtype(np.dtype(logits_dtype)), np
    )
    return ShardedForward(
        loss,
        coefs.loss,
        rows,
        local,
        grad_stats,
        coefs,
        target_weight,
        options,
        kernel,
        layout,
        comm.bytes_sent - bytes_before,
        comm.collectives - collectives_before,
    )
