"""Vocabulary-parallel linear + cross-entropy (``fastxent.distributed.linear_cross_entropy``)
against the single-process ``fastxent.linear_cross_entropy`` with the concatenated weight.

Ranks are threads over the in-process test double of the communicator (``sharding.ThreadGroup``);
the collectives it runs are the sharded cross-entropy's, tested on real engines in
``test_distributed.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BFLOAT16, assert_at_least_naive_accuracy
from sharding import OPTION_CASES, SHARDINGS, bounds, run_ranks

import fastxent
from fastxent import distributed, reference

NUM_ROWS, FEATURES, NUM_CLASSES = 11, 12, 1000
# Chunks of 4 rows: 11 rows make three chunks, the last one short.
CHUNK = {"block_rows": 4}
LOGIT_CASES = [name for name, spec in OPTION_CASES.items() if spec.get("from_logits", True)]


def make_layer(rng, name, dtype=np.float32, lead_shape=(NUM_ROWS,)):
    spec = dict(OPTION_CASES[name])
    hidden = rng.standard_normal(lead_shape + (FEATURES,)).astype(dtype)
    weight = (rng.standard_normal((NUM_CLASSES, FEATURES)) * 0.6).astype(dtype)
    bias = (rng.standard_normal(NUM_CLASSES) * 0.5).astype(dtype)
    labels = rng.integers(0, NUM_CLASSES, size=lead_shape)
    kwargs = {k: v for k, v in spec.items() if k not in ("class_weight", "sample_weight")}
    if "ignore_index" in spec:
        labels[rng.random(lead_shape) < 0.3] = spec["ignore_index"]
    if spec.get("class_weight"):
        kwargs["class_weight"] = rng.uniform(0.5, 2.0, NUM_CLASSES)
    if spec.get("sample_weight"):
        kwargs["sample_weight"] = rng.uniform(0.0, 3.0, lead_shape)
    return hidden, weight, bias, labels, kwargs


def on_ranks(widths, hidden, weight, bias, labels, *, with_grad=True, **kwargs):
    starts = bounds(widths)

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = dict(kwargs)
        if local.get("class_weight") is not None:
            local["class_weight"] = local["class_weight"][lo:hi]
        call = distributed.linear_cross_entropy_with_grad if with_grad else distributed.linear_cross_entropy
        result = call(hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, bias=bias[lo:hi], **local)
        return result, comm.collectives

    return run_ranks(len(widths), work)


def results_of(runs):
    for run in runs:
        if isinstance(run, BaseException):
            raise run
    return [result for result, _ in runs]


def assert_matches_single_process(widths, hidden, weight, bias, labels, rtol, **kwargs):
    ref = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **kwargs)
    options = {k: v for k, v in kwargs.items() if k not in ("block_rows", "memory_budget")}
    results = results_of(on_ranks(widths, hidden, weight, bias, labels, **options, **CHUNK))
    for loss, grad_hidden, _, _ in results:
        assert np.array_equal(loss, results[0][0], equal_nan=True), "ranks disagree on the loss"
        np.testing.assert_array_equal(grad_hidden, results[0][1])
    loss, grad_hidden = results[0][0], results[0][1]
    assert np.asarray(loss).dtype == np.asarray(ref[0]).dtype
    np.testing.assert_allclose(np.asarray(loss, np.float64), np.asarray(ref[0], np.float64), rtol=rtol)
    scale = float(np.max(np.abs(np.asarray(ref[2], np.float64))))
    np.testing.assert_allclose(grad_hidden.astype(np.float64), ref[1].astype(np.float64), rtol=rtol, atol=rtol * scale)
    grad_weight = np.concatenate([r[2] for r in results])
    grad_bias = np.concatenate([r[3] for r in results])
    assert grad_weight.dtype == hidden.dtype and grad_bias.dtype == hidden.dtype
    np.testing.assert_allclose(grad_weight.astype(np.float64), ref[2].astype(np.float64), rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(grad_bias.astype(np.float64), ref[3].astype(np.float64), rtol=rtol, atol=rtol * scale)
    losses = results_of(on_ranks(widths, hidden, weight, bias, labels, with_grad=False, **options, **CHUNK))
    np.testing.assert_allclose(np.asarray(losses[0], np.float64), np.asarray(ref[0], np.float64), rtol=rtol)


@pytest.mark.parametrize("size", sorted(SHARDINGS))
@pytest.mark.parametrize("reduction", fastxent.REDUCTIONS)
@pytest.mark.parametrize("case", LOGIT_CASES)
def test_matches_single_process(rng, case, reduction, size):
    hidden, weight, bias, labels, kwargs = make_layer(rng, case)
    assert_matches_single_process(SHARDINGS[size], hidden, weight, bias, labels, 2e-5, reduction=reduction, **kwargs)


def test_float64_matches_the_reference(rng):
    hidden, weight, bias, labels, kwargs = make_layer(rng, "everything", np.float64, lead_shape=(3, 4))
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **kwargs)
    results = results_of(on_ranks((400, 350, 250), hidden, weight, bias, labels, **kwargs, **CHUNK))
    np.testing.assert_allclose(results[0][0], ref[0], rtol=1e-10)
    assert results[0][1].shape == hidden.shape
    np.testing.assert_allclose(results[0][1], ref[1], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(np.concatenate([r[2] for r in results]), ref[2], rtol=1e-9, atol=1e-14)


def test_zero_width_shard_and_zero_rows(rng):
    hidden, weight, bias, labels, _ = make_layer(rng, "plain")
    assert_matches_single_process((1000, 0), hidden, weight, bias, labels, 2e-5)
    results = results_of(on_ranks((600, 400), hidden[:0], weight, bias, labels[:0], reduction="sum"))
    assert float(results[0][0]) == 0.0 and results[0][1].shape == (0, FEATURES)
    assert not np.any(results[0][2])


@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16], ids=["bfloat16", "float16"])
def test_half_precision_at_least_as_accurate_as_unfused(rng, dtype):
    hidden, weight, bias, labels, _ = make_layer(rng, "plain", dtype)
    results = results_of(on_ranks((600, 400), hidden, weight, bias, labels, **CHUNK))
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias)
    # The unfused computation in the same dtype: logits rounded to it, the loss's gradient too.
    logits = (hidden.astype(np.float32) @ weight.astype(np.float32).T + bias.astype(np.float32)).astype(dtype)
    naive_loss, naive_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels)
    naive_hidden = (naive_grad.astype(np.float32) @ weight.astype(np.float32)).astype(dtype)
    assert_at_least_naive_accuracy(results[0][0], ref[0], naive_loss, dtype, "loss")
    assert_at_least_naive_accuracy(results[0][1], ref[1], naive_hidden, dtype, "grad")


def test_collectives_per_call(rng):
    """One agreement, two all-reductions per chunk, one for the hidden gradient; the layout's
    all-gather only on a group's first call."""
    hidden, weight, bias, labels, _ = make_layer(rng, "plain")
    widths = (600, 400)
    starts = bounds(widths)

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        counts = []
        for call in (distributed.linear_cross_entropy_with_grad, distributed.linear_cross_entropy_with_grad):
            before = comm.collectives
            call(hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, bias=bias[lo:hi], **CHUNK)
            counts.append(comm.collectives - before)
        before = comm.collectives
        distributed.linear_cross_entropy(hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, **CHUNK)
        counts.append(comm.collectives - before)
        return counts

    chunks = 3
    for counts in run_ranks(2, work):
        assert counts == [1 + 2 * chunks + 1 + 1, 1 + 2 * chunks + 1, 1 + 2 * chunks], counts


def test_skipped_gradients(rng):
    hidden, weight, bias, labels, _ = make_layer(rng, "plain")
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        return distributed.linear_cross_entropy_with_grad(
            hidden, weight[lo:hi], labels, vocab_start=lo, group=comm, weight_grad=False
        )

    for loss, grad_hidden, grad_weight, grad_bias in results_of(run_ranks(2, lambda c: (work(c), 0))):
        assert np.isfinite(loss)
        assert grad_weight is None and grad_bias is None and grad_hidden.shape == hidden.shape


def assert_every_rank_raises(runs, *fragments):
    for rank, run in enumerate(runs):
        assert isinstance(run, ValueError), f"rank {rank} did not raise: {run!r}"
    for fragment in fragments:
        assert any(fragment in str(run) for run in runs), (fragment, [str(r) for r in runs])


def test_bad_label_raises_on_every_rank(rng):
    hidden, weight, bias, labels, _ = make_layer(rng, "plain")
    labels[9] = NUM_CLASSES  # in the last chunk: its position counts from the first row, not the chunk's
    runs = on_ranks((400, 350, 250), hidden, weight, bias, labels, **CHUNK)
    for run in runs:
        assert f"label {NUM_CLASSES} at position (9,)" in str(run), run
    labels = labels.reshape(1, NUM_ROWS)  # a lead shape of two dimensions: the position has two too
    runs = on_ranks((600, 400), hidden.reshape(1, NUM_ROWS, FEATURES), weight, bias, labels, **CHUNK)
    for run in runs:
        assert f"label {NUM_CLASSES} at position (0, 9)" in str(run), run


def test_argument_error_on_one_rank_raises_on_every_rank(rng):
    hidden, weight, bias, labels, _ = make_layer(rng, "plain")
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        shard = weight[lo:hi] if comm.rank == 0 else weight[lo:hi, :-1]
        return distributed.linear_cross_entropy(hidden, shard, labels, vocab_start=lo, group=comm), 0

    assert_every_rank_raises(run_ranks(2, work), "rank 1 rejected its arguments", "weight_shard shape (400, 11)")


def test_different_labels_raise_on_every_rank(rng):
    hidden, weight, bias, labels, _ = make_layer(rng, "plain")
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        mine = labels.copy()
        mine[0] = (mine[0] + comm.rank) % NUM_CLASSES
        return distributed.linear_cross_entropy(hidden, weight[lo:hi], mine, vocab_start=lo, group=comm), 0

    assert_every_rank_raises(run_ranks(2, work), "different labels")
