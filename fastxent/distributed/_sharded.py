"""Vocabulary-parallel cross-entropy: each rank holds one class range of every row.

The logits never move. Each rank computes the partial statistics of its class range with the
backend's kernel of the range layer (``fastxent._range.RangeKernel``), and two all-reductions of per-row numbers
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

So are failures: an exception on one rank between two collectives (out of memory, a kernel that
fails to compile, a BLAS error) is caught there, the rank still joins the next collective with a
status that says it failed, and every rank raises after it (the failing rank its own exception,
the others a ``RuntimeError`` naming it). Collective 1 carries that status in its error slot, and
collective 2 in one more value (``SUM_TAIL``), the number of ranks that failed since collective 1.
A caller that has collectives of its own after these (the linear + cross-entropy's chunks) hands
a failure of its own work to the next call as ``Shard.error``.
"""

from __future__ import annotations

import numbers
import zlib
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from fastxent import _checks as checks
from fastxent import _range
from fastxent._options import KernelOptions
from fastxent._range import RangeKernel, RowCoefficients, RowStats
from fastxent.distributed._comm import Communicator

# Layout of the per-call tail of the MAX buffer (float32 holds integers exactly below 2**24, so
# wider integers travel as 24-bit chunks).
_ERROR_RANK = 0  # 1 + the highest rank whose arguments were rejected, 0 if none; size + 1 + rank if it failed
_UNVERIFIED = 1  # 1 if this rank's shard layout has not been checked yet
_TOTAL = slice(2, 4)  # believed total class count (two 24-bit chunks), -1 if unknown
_NEG_TOTAL = slice(4, 6)
_PRINT = slice(6, 8)  # fingerprint of labels, sample weights and options (two 16-bit chunks)
_NEG_PRINT = slice(8, 10)
_BAD_LABEL = 10  # 1 if this rank found a label outside [0, V)
TAIL = 11
# The per-call tail of the SUM buffer: how many ranks failed since collective 1.
SUM_TAIL = 1


def error_status(comm: Communicator, error: Optional[BaseException]) -> float:
    """This rank's value of an error slot reduced by MAX: 0 without an error, 1 + rank for an
    argument error (``ValueError``/``TypeError``), size + 1 + rank for any other failure."""
    if error is None:
        return 0.0
    if isinstance(error, (ValueError, TypeError)):
        return comm.rank + 1.0
    return comm.size + comm.rank + 1.0


def raise_agreed_error(comm: Communicator, status: float, error: Optional[BaseException], stage: str) -> None:
    """Raise on every rank once a MAX-reduced error slot (``error_status``) is non-zero: this
    rank's own error where it has one, else one that names the rank that reported."""
    if status <= 0:
        return
    if error is not None:
        raise error
    if status > comm.size:
        raise RuntimeError(f"rank {int(status) - comm.size - 1} failed {stage} (see the error raised there)")
    raise ValueError(f"rank {int(status) - 1} rejected its arguments (see the error raised there)")


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
    checks.check_options(
        from_logits, reduction, label_smoothing, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap
    )
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


@dataclass(frozen=True)
class Shard:
    """This rank's part of a call: its rows of logits and its class range.

    Attributes:
        rows: (N, width) logits in the kernel's array type (unused when ``error`` is set).
        vocab_start: the shard's first global class.
        width: its number of classes.
        logits_dtype: the logits' dtype (float64 communicates in float64, anything else float32).
        class_weight: None or this shard's (width,) class weights.
        error: an error this rank found in its own arguments, or a failure of its own work since
            its last collective; every rank raises (the rows are not read).
    """

    rows: Any
    vocab_start: int
    width: int
    logits_dtype: Any
    class_weight: Any = None
    error: Optional[Exception] = None


@dataclass
class ShardedForward:
    """Everything the gradient of this rank's slice needs after the forward collectives."""

    loss: np.ndarray
    per_row_loss: np.ndarray
    rows: Any
    labels: np.ndarray  # local labels of this range
    stats: RowStats  # global statistics
    coefs: RowCoefficients
    target_weight: np.ndarray
    options: KernelOptions
    kernel: RangeKernel
    layout: ShardLayout
    bytes_sent: int
    collectives: int

    def grad(self, *, inplace: bool = False, upstream: Any = None):
        """This slice's gradient (rows' shape and dtype), times ``upstream``: None, a scalar, or
        one factor per row (the incoming gradient of a "none" reduction)."""
        coefs = self.coefs
        if upstream is not None:
            coefs = coefs.scaled(np.asarray(upstream, dtype=np.float64).reshape(-1))
        return self.kernel.grad(
            self.rows, self.labels, self.stats, coefs, self.target_weight, self.options, inplace=inplace
        )


@dataclass
class _LocalPart:
    """What this rank knows before the collectives (step 1)."""

    lead_shape: Tuple[int, ...]
    comm_dtype: np.dtype
    row_weight: np.ndarray  # float64 (N,)
    weights: Optional[np.ndarray]  # this shard's float64 class weights
    global_labels: np.ndarray  # int64 (N,), IGNORED for ignored rows
    valid: Optional[np.ndarray]  # labels' shape: not ignore_index (None without one)
    local: np.ndarray  # labels local to this shard's range
    layout: Optional[ShardLayout]  # the cached, verified layout, if any
    bad: Optional[tuple]  # (position, value) of a bad label found with a cached layout
    options: KernelOptions  # whole-vocabulary fields not known yet
    stats: RowStats  # this range's statistics (the neutral ones after an error)
    error: Optional[Exception]


def sharded_forward(
    comm: Communicator,
    kernel: RangeKernel,
    shard: Shard,
    labels: np.ndarray,
    settings: Settings,
    sample_weight: Any = None,
) -> ShardedForward:
    """Loss over the whole vocabulary and what this rank's gradient needs, with two collectives.

    Args:
        comm: the group's adapter.
        kernel: the range layer's kernel for ``shard.rows`` (``fastxent._range.RangeKernel``).
        shard: this rank's rows and class range.
        labels: integer array of global labels, identical on every rank (its shape is the loss's).
        settings: the checked options.
        sample_weight: None or broadcastable to ``labels``, identical on every rank.
    """
    collectives_before, bytes_before = comm.collectives, comm.bytes_sent
    # 1. this rank's statistics, and what it can check alone
    part = _local_part(comm, kernel, shard, labels, settings, sample_weight)
    # 2. collective 1 (MAX): the row maxima, and every rank's flags
    global_max, tail = _gather_flags_and_maxima(comm, part, shard, labels, settings, sample_weight)
    # 3. every rank raises together, or none does
    layout = _decide_errors(comm, part, shard, tail, labels, settings, global_max)
    # 4. collective 2 (SUM): the sums, relative to the global maxima
    sums = _reduce_sums(comm, part, shard.width, layout, settings, global_max)
    # 5. the global statistics -> per-row losses, gradient coefficients, the reduction
    forward = _finish(part, sums, layout, settings, global_max, shard, kernel)
    forward.bytes_sent = comm.bytes_sent - bytes_before
    forward.collectives = comm.collectives - collectives_before
    return forward


def _comm_dtype(logits_dtype: Any) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(logits_dtype) == np.float64 else np.dtype(np.float32)


def _local_part(comm, kernel, shard: Shard, labels, settings: Settings, sample_weight) -> _LocalPart:
    lead_shape = tuple(labels.shape)
    row_weight = checks.row_weights(sample_weight, lead_shape)
    error, weights = shard.error, None
    if error is None:
        try:
            weights = checks.class_weights(
                shard.class_weight, shard.width, np, what="hold this shard's weights, one per local class"
            )
        except ValueError as problem:
            error = problem
    flat = labels.reshape(-1).astype(np.int64)
    valid = None if settings.ignore_index is None else flat != settings.ignore_index
    global_labels = flat.copy()
    if valid is not None:
        global_labels[~valid] = _range.IGNORED
        valid = valid.reshape(lead_shape)
    layout = cached_layout(comm, int(shard.vocab_start), int(shard.width))
    bad = None if layout is None else checks.find_bad_label(labels, valid, layout.num_classes, np)
    # Out-of-range labels map to ELSEWHERE here (or IGNORED for -1): harmless, the call raises.
    local = _range.local_labels(global_labels, int(shard.vocab_start), int(shard.width))
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
    num_rows = global_labels.shape[0]
    stats = None
    if error is None:
        try:
            stats = kernel.stats(shard.rows, local, options)
        except Exception as failure:  # shared by collective 1: no rank is left waiting in it
            error = failure
    if stats is None:
        stats = _range.neutral_stats(num_rows)
    return _LocalPart(
        lead_shape,
        _comm_dtype(shard.logits_dtype),
        row_weight,
        weights,
        global_labels,
        valid,
        local,
        layout,
        bad,
        options,
        stats,
        error,
    )


def _gather_flags_and_maxima(comm, part: _LocalPart, shard: Shard, labels, settings, sample_weight):
    """Collective 1, MAX of N + TAIL values: per row this range's max (probabilities: minus its
    min, for the negative-input check); per call the flags of the module docstring."""
    num_rows = part.global_labels.shape[0]
    first = np.empty(num_rows + TAIL, dtype=part.comm_dtype)
    first[:num_rows] = part.stats.row_max if settings.from_logits else -part.stats.row_min
    tail = first[num_rows:]
    tail[_ERROR_RANK] = error_status(comm, part.error)
    tail[_UNVERIFIED] = 1.0 if part.layout is None else 0.0
    total = [-1.0, -1.0] if part.layout is None else _chunks(part.layout.num_classes, 2, 24)
    tail[_TOTAL], tail[_NEG_TOTAL] = total, [-t for t in total]
    weights_given = None if sample_weight is None else part.row_weight
    digest = _fingerprint(labels, weights_given, settings, shard.class_weight is not None, part.comm_dtype)
    printed = _chunks(digest, 2, 16)
    tail[_PRINT], tail[_NEG_PRINT] = printed, [-p for p in printed]
    tail[_BAD_LABEL] = 0.0 if part.bad is None else 1.0
    comm.allreduce_max(first)
    return first[:num_rows], tail


def _decide_errors(comm, part: _LocalPart, shard: Shard, tail, labels, settings, global_max) -> ShardLayout:
    """Raise on every rank, from the MAX's results, or return the verified layout."""
    layout, bad = part.layout, part.bad
    raise_agreed_error(comm, float(tail[_ERROR_RANK]), part.error, "before the statistics' first all-reduction")
    if not _all_equal(tail, _PRINT, _NEG_PRINT):
        raise ValueError(
            "ranks passed different labels, sample weights or options: they must be identical "
            "on every rank (only the logits and class weights are sharded)"
        )
    if tail[_UNVERIFIED] > 0 or not _all_equal(tail, _TOTAL, _NEG_TOTAL):
        # Every rank takes this branch together: the flags came out of the same MAX.
        layout = check_tiling(comm, int(shard.vocab_start), int(shard.width))
        # Labels are identical on every rank (fingerprint), so every rank finds the same label.
        bad = checks.find_bad_label(labels, part.valid, layout.num_classes, np)
    elif tail[_BAD_LABEL] > 0 and bad is None:
        raise ValueError(
            f"another rank found a label outside [0, {layout.num_classes}); labels must be identical on every rank"
        )
    if bad is not None:
        message = checks.bad_label_message(
            *bad, layout.num_classes, settings.ignore_index, of=" of the whole (sharded) vocabulary"
        )
        raise ValueError(message)
    if not settings.from_logits and global_max.size:
        # The MAX held minus each row's minimum: a positive value is a negative probability.
        checks.reject_negative_probabilities(-global_max, part.lead_shape, where=" in some shard")
    return layout


class _Sums(NamedTuple):
    sum_exp: np.ndarray  # float64 (N,), relative to the global max
    combined: np.ndarray  # float64 (N,): d = v_y - max, or A with label smoothing (see below)
    target_weight: np.ndarray  # float64 (N,): class_weight[y], 0 for ignored rows
    weight_total: float  # sum of all class weights (the class count without them)


def _reduce_sums(comm, part: _LocalPart, width: int, layout: ShardLayout, settings, global_max) -> _Sums:
    """Collective 2, SUM: per row the sum of exps rescaled to the global max (probabilities: the
    clipped sum), the target term, [class weights] the target's weight; per call [class weights
    and smoothing] the shard's sum of class weights."""
    num_rows = part.global_labels.shape[0]
    weights = part.weights
    smoothing = settings.label_smoothing != 0.0
    fields = 2 + int(weights is not None)
    extra = int(weights is not None and smoothing)
    second = np.zeros(fields * num_rows + extra + SUM_TAIL, dtype=part.comm_dtype)
    failure = None
    try:
        _fill_sums(second, part, width, layout, settings, global_max)
    except Exception as error:  # shared by collective 2: no rank is left waiting in it
        failure = error
    second[-1] = 0.0 if failure is None else 1.0
    comm.allreduce_sum(second)
    if second[-1] > 0:
        if failure is not None:
            raise failure
        raise RuntimeError(f"{int(second[-1])} other rank(s) failed before the statistics' second all-reduction")

    weight_total = float(layout.num_classes)
    counted = part.global_labels != _range.IGNORED
    if weights is not None:
        target_weight = np.where(counted, second[2 * num_rows : 3 * num_rows].astype(np.float64), 0.0)
        if smoothing:
            weight_total = float(second[3 * num_rows])
    else:
        target_weight = np.where(counted, 1.0, 0.0)
    return _Sums(
        second[:num_rows].astype(np.float64),
        second[num_rows : 2 * num_rows].astype(np.float64),
        target_weight,
        weight_total,
    )


def _fill_sums(second: np.ndarray, part: _LocalPart, width: int, layout: ShardLayout, settings, global_max) -> None:
    """This rank's contribution to collective 2, written into ``second`` (see ``_reduce_sums``)."""
    num_rows = part.global_labels.shape[0]
    stats, weights, local = part.stats, part.weights, part.local
    smoothing = settings.label_smoothing != 0.0
    eps, num_classes = settings.label_smoothing, layout.num_classes
    row_max = global_max.astype(np.float64) if settings.from_logits else np.zeros(num_rows)
    local_weight_total = float(width) if weights is None else float(weights.sum())
    sum_part, target_part = second[:num_rows], second[num_rows : 2 * num_rows]
    counted = part.global_labels != _range.IGNORED
    owned = np.flatnonzero(local >= 0)
    local_target_weight = _range.target_weights(local, weights)
    if settings.from_logits:
        sum_part[:] = _range.rescale_sum_exp(stats.row_max, stats.sum_exp, row_max)
    else:
        sum_part[:] = stats.sum_exp
    # The target's value relative to the global max, d = v_y - max (probabilities: log clip(p_y)),
    # from the rank that owns it. With label smoothing the loss needs d only inside
    #     A = (1 - eps) w_y d + eps / V * sum_c w_c (v_c - max),
    # a sum over the ranks like the rest, so A travels in d's place (every rank adds its share
    # of the smoothing sum): label smoothing costs no extra bytes. Relative to the max, because
    # float32 could not resolve a difference next to a large logit.
    with np.errstate(invalid="ignore", over="ignore"):
        relative_target = stats.target_value[owned] - row_max[owned]
        if smoothing:
            relative_sum = stats.weighted_sum - (local_weight_total * row_max if local_weight_total else 0.0)
            share = np.where(counted, eps / num_classes * relative_sum, 0.0)
            share[owned] += (1.0 - eps) * local_target_weight[owned] * relative_target
            target_part[:] = share
        else:
            target_part[owned] = relative_target
    if weights is not None:
        second[2 * num_rows : 3 * num_rows] = local_target_weight
        if smoothing:
            second[3 * num_rows] = local_weight_total


def _finish(part: _LocalPart, sums: _Sums, layout, settings: Settings, global_max, shard: Shard, kernel):
    num_rows = part.global_labels.shape[0]
    row_max = global_max.astype(np.float64) if settings.from_logits else np.zeros(num_rows)
    counted = part.global_labels != _range.IGNORED
    eps, num_classes = settings.label_smoothing, layout.num_classes
    # The epilogue takes (target value, weighted sum); give it values that reproduce A: with
    # smoothing, target value = max and (eps / V)(W max - weighted sum) = -A; without, max + d.
    with np.errstate(invalid="ignore", over="ignore"):
        if eps != 0.0:
            epilogue_target = row_max
            weighted_sum = np.where(counted, sums.weight_total * row_max + sums.combined * (num_classes / eps), 0.0)
        else:
            epilogue_target = row_max + sums.combined
            weighted_sum = np.zeros(num_rows)
    no_min = np.full(num_rows, np.inf)
    merged = RowStats(row_max, sums.sum_exp, epilogue_target, np.zeros(num_rows), weighted_sum, no_min)
    # The gradient at the target is the owner's alone: it uses its exact local values.
    stats = part.stats
    grad_stats = RowStats(row_max, sums.sum_exp, stats.target_value, stats.target_input, weighted_sum, no_min)

    if settings.reduction == "mean":
        denominator = float(np.sum(np.where(counted, part.row_weight * sums.target_weight, 0.0)))
    elif settings.reduction == "sum_over_batch_size":
        denominator = float(np.count_nonzero(counted))
    else:
        denominator = 1.0
    options = replace(
        part.options,
        num_classes=num_classes,
        class_weight_total=sums.weight_total,
        grad_scale=checks.grad_scale_for(denominator),
    )
    coefs = _range.finish_rows(merged, part.local, sums.target_weight, part.row_weight, options)
    loss_dtype = checks.loss_dtype(np.dtype(shard.logits_dtype))
    loss = checks.reduce_loss(coefs.loss, settings.reduction, denominator, part.lead_shape, loss_dtype, np)
    return ShardedForward(
        loss, coefs.loss, shard.rows, part.local, grad_stats, coefs, sums.target_weight, options, kernel, layout, 0, 0
    )
