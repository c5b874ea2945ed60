"""Vocabulary-parallel per-token statistics (``fastxent.distributed.linear_token_stats`` and its
forward/backward) against the single-process ``fastxent.linear_token_stats`` with the
concatenated head. Ranks are threads over the in-process communicator double
(``sharding.ThreadGroup``); the collectives are the ones ``test_distributed.py`` runs on real
engines."""

from __future__ import annotations

import numpy as np
import pytest
from sharding import bounds, run_ranks

from fastxent import _linear_api, distributed

FEATURES, NUM_CLASSES = 12, 300
LEAD_SHAPE = (3, 5)


def layer(rng, dtype):
    hidden = rng.standard_normal(LEAD_SHAPE + (FEATURES,)).astype(dtype)
    weight = (rng.standard_normal((NUM_CLASSES, FEATURES)) * 0.5).astype(dtype)
    bias = (rng.standard_normal(NUM_CLASSES) * 0.3).astype(dtype)
    # Ties for the argmax across shards: class 250 repeats class 10 (lowest index wins), and
    # masked classes (-inf bias) add nothing to the entropy.
    weight[10] = np.where(rng.random(FEATURES) < 0.5, -1.5, 1.5)
    weight[250], bias[250] = weight[10], bias[10]
    bias[[5, 140, 299]] = -np.inf
    hidden[0, 0] = weight[10] * 4.0  # row 0's argmax is the tied pair
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    labels[1, 2] = -100
    labels[2, 4] = 140  # a masked target: logprob -inf
    return hidden, weight, bias, labels


def sharded(widths, function):
    """``function(comm, lo, hi)`` on one thread per shard; results in rank order (errors raised)."""
    starts = bounds(widths)
    runs = run_ranks(len(widths), lambda comm: function(comm, starts[comm.rank], starts[comm.rank + 1]))
    return runs


OPTIONS = dict(temperature=0.7, softcap=6.0, ignore_index=-100, block_rows=4, block_classes=64)


@pytest.mark.parametrize("widths", [(300,), (100, 0, 200), (37, 150, 113)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_single_process(rng, widths, dtype):
    """Forward values on every rank (argmax exactly, ties to the lowest index) and the gradients
    of a*logprob + b*entropy + c*lse (d hidden on every rank, the weight and bias slices) equal
    the single-process head's."""
    hidden, weight, bias, labels = layer(rng, dtype)
    a = rng.standard_normal(LEAD_SHAPE)
    b = rng.standard_normal(LEAD_SHAPE)
    c = rng.standard_normal(LEAD_SHAPE)
    whole = _linear_api.linear_token_stats_forward(hidden, weight, labels, bias=bias, **OPTIONS)
    grads = _linear_api.linear_token_stats_backward(hidden, weight, whole, a, b, c, bias=bias)

    def work(comm, lo, hi):
        forward = distributed.linear_token_stats_forward(
            hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, bias=bias[lo:hi], **OPTIONS
        )
        backward = distributed.linear_token_stats_backward(
            hidden, weight[lo:hi], forward, a, b, c, vocab_start=lo, group=comm, bias=bias[lo:hi]
        )
        return forward.values, backward

    runs = sharded(widths, work)
    for run in runs:
        if isinstance(run, BaseException):
            raise run
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    assert whole.values.argmax[0, 0] == 10
    for values, (grad_hidden, _, _) in runs:
        for got, expected in zip(values[:3], whole.values[:3], strict=True):
            assert got.dtype == expected.dtype
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)
        np.testing.assert_array_equal(values.argmax, whole.values.argmax)
        np.testing.assert_array_equal(values.logprob, runs[0][0].logprob)
        scale = float(np.max(np.abs(grads[0])))
        np.testing.assert_allclose(grad_hidden, grads[0], rtol=rtol * 10, atol=rtol * 10 * scale)
        np.testing.assert_array_equal(grad_hidden, runs[0][1][0])
    grad_weight = np.concatenate([backward[1] for _, backward in runs])
    grad_bias = np.concatenate([backward[2] for _, backward in runs])
    for got, expected in ((grad_weight, grads[1]), (grad_bias, grads[2])):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(got, expected, rtol=rtol * 10, atol=rtol * 10 * scale)
    plain = sharded(widths, lambda comm, lo, hi: distributed.linear_token_stats(
        hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, bias=bias[lo:hi], **OPTIONS))  # fmt: skip
    np.testing.assert_array_equal(plain[0].entropy, runs[0][0].entropy)


def test_errors_raise_on_every_rank(rng):
    """A label outside [0, V_total) (value and position), a shard of the wrong width, shards
    that leave a gap, and CuPy-less hidden of the wrong rank: every rank raises the same kind."""
    hidden, weight, bias, labels = layer(rng, np.float32)
    bad = labels.copy()
    bad[2, 1] = NUM_CLASSES

    def call(comm, lo, hi, labels=labels, weight=weight, starts=None):
        start = lo if starts is None else starts[comm.rank]
        return distributed.linear_token_stats(hidden, weight[lo:hi], labels, vocab_start=start, group=comm, **OPTIONS)

    outcomes = sharded((100, 200), lambda comm, lo, hi: call(comm, lo, hi, labels=bad))
    for outcome in outcomes:
        assert isinstance(outcome, ValueError) and "label 300 at position (2, 1)" in str(outcome), outcome
    narrow = weight[:, :-1]
    outcomes = sharded((100, 200), lambda comm, lo, hi: call(comm, lo, hi, weight=narrow if comm.rank else weight))
    assert all(isinstance(outcome, ValueError) for outcome in outcomes), outcomes
    outcomes = sharded((100, 200), lambda comm, lo, hi: call(comm, lo, hi, starts=(0, 150)))
    assert all(isinstance(o, ValueError) and "tile" in str(o) for o in outcomes), outcomes
