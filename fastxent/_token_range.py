"""The range layer of the per-token statistics: their per-range form, exact merge and float64
epilogue (no backend, no framework; NumPy on O(N) host numbers, or the array module given).

With z = softcap(x) / temperature, a class range's statistics of every row, float64 (N,):

    row_max       m = max z over the range (-inf for an empty or all -inf range)
    sum_exp       S = sum e^(z - m) (relative to 0 while m = -inf)
    centred_sum   T = sum e^(z - m) (z - m), a class of z = -inf adding 0
    target_value  z_y where the row's target lies in the range, else 0
    raw_max       the largest raw logit x of the range (the argmax's value)
    argmax        int64, the first index of ``raw_max`` over the whole vocabulary

Merging disjoint ranges moves each (S, T) to the common max m* with f = e^(m - m*):
S* = sum f S, T* = sum f (T + (m - m*) S); target values add; the argmax is that of the
larger raw max, the lower index on a tie. From merged statistics: lse = m + log S,
logprob = (z_y - m) - log S, entropy = log S - T / S.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from fastxent._range import IGNORED, rescale_sum_exp


class TokenRowStats(NamedTuple):
    """Statistics of every row over one class range (see the module docstring)."""

    row_max: Any
    sum_exp: Any
    centred_sum: Any
    target_value: Any
    raw_max: Any
    argmax: Any


class TokenValues(NamedTuple):
    """Per-row results in float64 (argmax int64): ignored rows have logprob 0 and entropy 0."""

    logprob: np.ndarray
    entropy: np.ndarray
    lse: np.ndarray
    argmax: np.ndarray


def shift_argmax(stats: TokenRowStats, offset: int) -> TokenRowStats:
    """The statistics of a range that starts ``offset`` classes into the vocabulary (its
    argmax counted from the range's start before)."""
    return stats._replace(argmax=stats.argmax + offset)


def _moved(row_max: np.ndarray, sum_exp: np.ndarray, centred_sum: np.ndarray, new_max: np.ndarray):
    """(S, T) of a range moved to the merged max (see the module docstring); a range with
    S = 0 (empty or all -inf) stays (0, 0) rather than forming -inf * 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        shift = np.where(sum_exp == 0.0, 0.0, row_max - new_max)
        moved_sum = rescale_sum_exp(row_max, sum_exp, new_max)
        moved_centred = rescale_sum_exp(row_max, centred_sum + shift * sum_exp, new_max)
    return moved_sum, moved_centred


def merge_token_stats(parts: Sequence[TokenRowStats]) -> TokenRowStats:
    """Exact merge of the statistics of disjoint class ranges of the same rows (argmax already
    counted over the whole vocabulary)."""
    if not parts:
        raise ValueError("merge_token_stats needs at least one TokenRowStats")
    merged = parts[0]
    for part in parts[1:]:
        row_max = np.maximum(merged.row_max, part.row_max)
        sum_a, centred_a = _moved(merged.row_max, merged.sum_exp, merged.centred_sum, row_max)
        sum_b, centred_b = _moved(part.row_max, part.sum_exp, part.centred_sum, row_max)
        # The later range wins the argmax only with a strictly larger raw max (or a lower index
        # on a tie: ranges may come in any order); a NaN raw max wins, as a NaN wins the argmax.
        merged_nan, part_nan = np.isnan(merged.raw_max), np.isnan(part.raw_max)
        tie = (part.raw_max == merged.raw_max) | (merged_nan & part_nan)
        part_wins = (part.raw_max > merged.raw_max) & ~merged_nan
        part_wins |= part_nan & ~merged_nan
        part_wins |= tie & (part.argmax < merged.argmax)
        merged = TokenRowStats(
            row_max,
            sum_a + sum_b,
            centred_a + centred_b,
            merged.target_value + part.target_value,
            np.where(part_wins, part.raw_max, merged.raw_max),
            np.where(part_wins, part.argmax, merged.argmax),
        )
    return merged


def finish_token_stats(stats: TokenRowStats, labels: Any, xp: Any = np) -> TokenValues:
    """logprob, entropy, lse (float64) and argmax of every row from merged statistics; rows
    whose label is IGNORED (or negative) get logprob 0 and entropy 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        row_max = stats.row_max
        finite_max = xp.where(row_max > -np.inf, row_max, 0.0)
        log_sum = xp.log(stats.sum_exp)
        lse = finite_max + log_sum
        logprob = (stats.target_value - finite_max) - log_sum
        # An all -inf row (S = 0) has no distribution: NaN, as its log-probability.
        entropy = log_sum - stats.centred_sum / stats.sum_exp
    counted = labels >= 0
    return TokenValues(
        xp.where(counted, logprob, 0.0), xp.where(counted, entropy, 0.0), lse, stats.argmax.astype(xp.int64)
    )


def mean_shift(stats: TokenRowStats) -> np.ndarray:
    """T / S = sum p (z - m) per row: sum p z relative to the max, which the gradient needs."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return stats.centred_sum / stats.sum_exp


__all__ = [
    "IGNORED",
    "TokenRowStats",
    "TokenValues",
    "finish_token_stats",
    "merge_token_stats",
    "mean_shift",
    "shift_argmax",
]
