"""A rank whose work fails, and that stays alive as a training loop that caught the error would,
never leaves the other ranks waiting in a collective: every rank raises promptly (the failing
one its own exception, the others a RuntimeError naming it), and the group stays usable.

Thread ranks (``sharding.run_ranks``): a missed failure would leave rank 0 in the barrier until
its 60 s timeout. The same with real processes over Gloo is in ``distributed_worker.py``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sharding import bounds, run_ranks

import fastxent
from fastxent import distributed
from fastxent.cpu.linear import NumpyLinearOps
from fastxent.cpu.xent import NumpyKernel
from fastxent.distributed import _sharded

# Far below the thread barrier's 60 s: a rank that waited for it fails this.
PROMPT_S = 10.0
WIDTHS = (600, 400)


class InjectedFailure(Exception):
    """What the failing rank's work raises (not a ValueError/TypeError: not an argument error)."""


_failing = threading.local()


def fail_on_rank_1(monkeypatch, owner, name, *, after_calls=0):
    """Make ``owner.name`` raise InjectedFailure on the thread of rank 1, from its
    ``after_calls``-th call on (per call of the test's work)."""
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        if getattr(_failing, "armed", False):
            _failing.calls += 1
            if _failing.calls > after_calls:
                raise InjectedFailure(f"{name} failed on rank 1")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def run_with_failure(call):
    """Run ``call(comm, lo, hi)`` on two thread ranks: once clean (the kernels compile), once
    with rank 1's failure armed, then clean again; (outcome, seconds to it, last result) per rank."""
    starts = bounds(WIDTHS)

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        _failing.armed = False
        call(comm, lo, hi)
        _failing.armed, _failing.calls = comm.rank == 1, 0
        began = time.monotonic()
        try:
            outcome = call(comm, lo, hi)
        except Exception as error:  # the failing rank catches it and stays in the group
            outcome = error
        elapsed = time.monotonic() - began
        _failing.armed = False
        return outcome, elapsed, call(comm, lo, hi)

    results = run_ranks(2, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def assert_failure_shared(results, stage_fragment):
    (outcome0, elapsed0, _), (outcome1, elapsed1, _) = results
    assert isinstance(outcome1, InjectedFailure), f"rank 1 raised {outcome1!r}, not its own failure"
    assert isinstance(outcome0, RuntimeError), f"rank 0 did not raise: {outcome0!r}"
    assert "rank" in str(outcome0) and stage_fragment in str(outcome0), str(outcome0)
    assert elapsed0 < PROMPT_S and elapsed1 < PROMPT_S, (elapsed0, elapsed1)


def sparse_case(rng):
    logits = (3.0 * rng.standard_normal((12, sum(WIDTHS)))).astype(np.float32)
    labels = rng.integers(0, sum(WIDTHS), size=12)
    return logits, labels


def test_failure_in_the_statistics_pass(rng, monkeypatch):
    logits, labels = sparse_case(rng)
    fail_on_rank_1(monkeypatch, NumpyKernel, "stats")
    results = run_with_failure(
        lambda comm, lo, hi: distributed.sparse_cross_entropy_with_grad(
            logits[:, lo:hi], labels, vocab_start=lo, group=comm
        )
    )
    assert_failure_shared(results, "rank 1 failed")
    expected = fastxent.sparse_cross_entropy(logits, labels)
    for _, _, (loss, _) in results:  # the group works after the failure
        np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_failure_between_the_two_collectives(rng, monkeypatch):
    logits, labels = sparse_case(rng)
    fail_on_rank_1(monkeypatch, _sharded, "_fill_sums")
    results = run_with_failure(
        lambda comm, lo, hi: distributed.sparse_cross_entropy(logits[:, lo:hi], labels, vocab_start=lo, group=comm)
    )
    assert_failure_shared(results, "rank(s) failed")
    expected = fastxent.sparse_cross_entropy(logits, labels)
    for _, _, loss in results:
        np.testing.assert_allclose(loss, expected, rtol=1e-6)


def linear_case(rng):
    hidden = rng.standard_normal((15, 8)).astype(np.float32)
    weight = (0.6 * rng.standard_normal((sum(WIDTHS), 8))).astype(np.float32)
    labels = rng.integers(0, sum(WIDTHS), size=15)
    return hidden, weight, labels


@pytest.mark.parametrize(
    "method, after_calls, fragment",
    [
        ("logits", 1, "rank 1 failed"),  # the second chunk's GEMM
        ("hidden_grad", 2, "after the last chunk"),  # the last chunk's dX share: dX's all-reduction
        ("accumulate_weight_grad", 0, "rank 1 failed"),  # the first chunk's dW: the next chunk's statistics
    ],
)
def test_failure_in_a_chunk_of_the_linear_path(rng, monkeypatch, method, after_calls, fragment):
    hidden, weight, labels = linear_case(rng)
    fail_on_rank_1(monkeypatch, NumpyLinearOps, method, after_calls=after_calls)

    def call(comm, lo, hi):
        return distributed.linear_cross_entropy_with_grad(
            hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, block_rows=5
        )

    results = run_with_failure(call)
    assert_failure_shared(results, fragment)
    expected_loss, expected_hidden, _ = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels)[:3]
    for _, _, (loss, grad_hidden, _, _) in results:
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
        np.testing.assert_allclose(grad_hidden, expected_hidden, rtol=1e-4, atol=1e-6)


def test_failure_when_only_the_weight_gradient_is_wanted(rng, monkeypatch):
    hidden, weight, labels = linear_case(rng)
    fail_on_rank_1(monkeypatch, NumpyLinearOps, "accumulate_weight_grad", after_calls=2)

    def call(comm, lo, hi):
        return distributed.linear_cross_entropy_with_grad(
            hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, block_rows=5, hidden_grad=False, bias_grad=False
        )

    results = run_with_failure(call)
    assert_failure_shared(results, "after the last chunk")
    _, _, expected_weight = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels)[:3]
    starts = bounds(WIDTHS)
    for rank, (_, _, (_, grad_hidden, grad_weight, _)) in enumerate(results):
        assert grad_hidden is None
        np.testing.assert_allclose(grad_weight, expected_weight[starts[rank] : starts[rank + 1]], rtol=1e-4, atol=1e-6)
