"""fastxent.linear_cross_entropy[_with_grad]: the fused linear layer + cross-entropy.

Checked three ways: against the float64 composition (``fastxent.reference``), against PyTorch's
unfused ``F.linear`` + ``F.cross_entropy`` and its ``F.linear_cross_entropy``, and in half
precision against the unfused computation in the same dtype. Small block shapes are forced so
small inputs still cross several row chunks and class blocks (V not a multiple of either).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
from conftest import (
    BFLOAT16,
    OPTION_NAMES,
    REDUCTIONS,
    assert_at_least_naive_accuracy,
    assert_loss_close,
    dtype_id,
    make_case,
    tolerance,
)

import fastxent
from fastxent import _linear, reference
from fastxent._linear_api import plan_linear_blocks
from fastxent.cpu import blas

# Small blocks: 16-row chunks and 256-class blocks over V = 1000 (neither divides it).
SMALL_BLOCKS = {"block_rows": 16, "block_classes": 256}
NUM_CLASSES = 1000
FEATURES = 24
LEAD_SHAPE = (6, 7)


def random_layer(rng, lead_shape, features, num_classes, dtype, *, bias=True):
    """(hidden, weight, bias) with logits of a few units, as an LM head gives them."""
    hidden = rng.standard_normal(lead_shape + (features,)).astype(dtype)
    weight = (rng.standard_normal((num_classes, features)) / np.sqrt(features) * 2.0).astype(dtype)
    bias_values = (rng.standard_normal(num_classes) * 0.5).astype(dtype) if bias else None
    return hidden, weight, bias_values


def linear_grad_atol(reference_grad, dtype) -> float:
    """Absolute tolerance of a GEMM output: its float32 (float64) accumulation error relative to
    the largest entry (sums of V or N products)."""
    magnitude = float(np.max(np.abs(reference_grad), initial=0.0))
    return (1e-12 if np.dtype(dtype) == np.float64 else 2e-6) * max(magnitude, 1e-4)


def assert_linear_grad_close(got, ref, dtype):
    assert got is not None
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), ref, rtol=tol.grad_rtol * 5, atol=linear_grad_atol(ref, dtype)
    )


def linear_case(rng, option, dtype, *, lead_shape=LEAD_SHAPE, num_classes=NUM_CLASSES, bias=True):
    _, labels, options = make_case(rng, option, lead_shape, num_classes, np.float32)
    hidden, weight, bias_values = random_layer(rng, lead_shape, FEATURES, num_classes, dtype, bias=bias)
    return hidden, weight, bias_values, labels, options


# ----------------------------------------------------------------------------------------
# Against the float64 composition
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3], ids=["one-thread", "three-workers"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTION_NAMES)
def test_matches_float64_composition(rng, option, reduction, dtype, threads):
    hidden, weight, bias, labels, options = linear_case(rng, option, dtype)
    options["reduction"] = reduction
    options["threads"] = threads
    ref_loss, ref_hidden, ref_weight, ref_bias = reference.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, **{k: v for k, v in options.items() if k != "threads"}
    )
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, **options, **SMALL_BLOCKS
    )
    assert loss.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert_loss_close(loss, ref_loss, dtype, scale=10.0)
    assert grad_hidden.shape == hidden.shape
    assert_linear_grad_close(grad_hidden, ref_hidden, dtype)
    assert_linear_grad_close(grad_weight, ref_weight, dtype)
    assert_linear_grad_close(grad_bias, ref_bias, dtype)
    # The loss-only call (class blocks) gives the same loss as the chunked one.
    loss_only = fastxent.linear_cross_entropy(hidden, weight, labels, bias=bias, **options, **SMALL_BLOCKS)
    assert_loss_close(loss_only, ref_loss, dtype, scale=10.0)


@pytest.mark.parametrize(
    "blocks",
    [
        {},
        {"block_rows": 1},
        {"block_rows": 5, "block_classes": 7},
        {"memory_budget": 1},
        # More workers than a chunk has rows, and than V = 1000 has 256-class blocks.
        {"block_rows": 3, "threads": 4},
        {"block_rows": 1, "threads": 2},
        {"threads": 7, "block_classes": 256},
    ],
)
def test_block_shapes_agree(rng, blocks):
    hidden, weight, bias, labels, options = linear_case(rng, "everything", np.float64)
    ref_loss, ref_hidden, ref_weight, ref_bias = reference.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, **options
    )
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, **options, **blocks
    )
    assert_loss_close(loss, ref_loss, np.float64)
    assert_loss_close(
        fastxent.linear_cross_entropy(hidden, weight, labels, bias=bias, **options, **blocks), ref_loss, np.float64
    )
    for got, ref in ((grad_hidden, ref_hidden), (grad_weight, ref_weight), (grad_bias, ref_bias)):
        assert_linear_grad_close(got, ref, np.float64)


def test_skipped_gradients_are_none_and_the_rest_unchanged(rng):
    hidden, weight, bias, labels, options = linear_case(rng, "plain", np.float64)
    full = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **SMALL_BLOCKS)
    frozen = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, weight_grad=False, bias_grad=False, **SMALL_BLOCKS
    )
    assert frozen[2] is None and frozen[3] is None
    np.testing.assert_array_equal(frozen[1], full[1])
    only_weight = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, hidden_grad=False, **SMALL_BLOCKS
    )
    assert only_weight[1] is None
    np.testing.assert_array_equal(only_weight[2], full[2])
    nothing = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, hidden_grad=False, weight_grad=False, bias_grad=False
    )
    assert nothing[1:] == (None, None, None)
    assert_loss_close(nothing[0], full[0], np.float64)
    no_bias = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels)
    assert no_bias[3] is None


def test_inputs_are_not_modified(rng):
    hidden, weight, bias, labels, options = linear_case(rng, "everything", np.float32)
    copies = [a.copy() for a in (hidden, weight, bias, labels)]
    fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **options, **SMALL_BLOCKS)
    fastxent.linear_cross_entropy(hidden, weight, labels, bias=bias, **options, **SMALL_BLOCKS)
    for array, copy in zip((hidden, weight, bias, labels), copies, strict=True):
        np.testing.assert_array_equal(array, copy)


# ----------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(rng, reduction):
    hidden, weight, bias, _, _ = linear_case(rng, "plain", np.float32)
    labels = np.full(LEAD_SHAPE, -100)
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, ignore_index=-100, reduction=reduction, **SMALL_BLOCKS
    )
    assert np.all(loss == 0.0)
    assert not grad_hidden.any() and not grad_weight.any() and not grad_bias.any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(rng, reduction):
    _, weight, bias = random_layer(rng, (), FEATURES, NUM_CLASSES, np.float32)
    hidden = np.zeros((0, FEATURES), np.float32)
    labels = np.zeros(0, np.int64)
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, reduction=reduction
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert grad_hidden.shape == (0, FEATURES)
    assert grad_weight.shape == weight.shape and not grad_weight.any() and not grad_bias.any()
    assert fastxent.linear_cross_entropy(hidden, weight, labels, reduction=reduction).shape == loss.shape


@pytest.mark.parametrize("features, num_classes", [(1, 1000), (1, 1), (24, 1), (3, 2049)])
def test_small_dimensions(rng, features, num_classes):
    hidden, weight, bias = random_layer(rng, (9,), features, num_classes, np.float64)
    labels = rng.integers(0, num_classes, 9)
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, label_smoothing=0.1)
    got = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, label_smoothing=0.1, block_rows=4)
    assert_loss_close(got[0], ref[0], np.float64)
    for g, r in zip(got[1:], ref[1:], strict=True):
        assert_linear_grad_close(g, r, np.float64)


@pytest.mark.slow
def test_more_than_2_31_logits():
    """N x V > 2**31 with H = 1: only blocks ever exist. Every weight is 1/2 except class
    ``special`` (1), so each row's logits take two values and the answer has a closed form."""
    num_rows, num_classes, special = 2**16, 2**15 + 1, 12345
    assert num_rows * num_classes > 2**31
    rng = np.random.default_rng(0)
    hidden = rng.uniform(-2, 2, (num_rows, 1)).astype(np.float32)
    weight = np.full((num_classes, 1), 0.5, np.float32)
    weight[special] = 1.0
    labels = rng.integers(0, num_classes, num_rows)
    labels[::7] = special
    h = hidden[:, 0].astype(np.float64)
    target_logit = np.where(labels == special, h, h / 2)
    sum_exp = (num_classes - 1) * np.exp(h / 2) + np.exp(h)
    expected = np.mean(np.log(sum_exp) - target_logit)
    loss = fastxent.linear_cross_entropy(hidden, weight, labels)
    assert_loss_close(loss, expected, np.float32, scale=10.0)
    loss, grad_hidden, grad_weight, _ = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels)
    assert_loss_close(loss, expected, np.float32, scale=10.0)
    # dlogits_ic = (p_ic - [c = y_i]) / N with p = e^(h/2) / S elsewhere, e^h / S at ``special``.
    p_other, p_special = np.exp(h / 2) / sum_exp, np.exp(h) / sum_exp
    w_target = np.where(labels == special, 1.0, 0.5)
    expected_hidden = ((num_classes - 1) * p_other * 0.5 + p_special - w_target) / num_rows
    np.testing.assert_allclose(grad_hidden[:, 0], expected_hidden, rtol=1e-4, atol=1e-9)
    counts = np.bincount(labels, minlength=num_classes)
    others = (np.sum(p_other * h) - np.bincount(labels, weights=h, minlength=num_classes)) / num_rows
    expected_special = (np.sum(p_special * h) - np.sum(h[labels == special])) / num_rows
    assert counts[special] > 0
    np.testing.assert_allclose(grad_weight[special, 0], expected_special, rtol=1e-4, atol=1e-9)
    mask = np.arange(num_classes) != special
    np.testing.assert_allclose(grad_weight[mask, 0], others[mask], rtol=1e-3, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Bad input: a clear error, nothing computed or written
# ----------------------------------------------------------------------------------------


def _bad_inputs(rng):
    hidden, weight, bias = random_layer(rng, (5,), 8, 30, np.float32)
    labels = rng.integers(0, 30, 5)
    return hidden, weight, bias, labels


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda h, w, b, y: (h, w[:, :7], b, y), ValueError, r"does not match hidden shape"),
        (lambda h, w, b, y: (h, w[0], b, y), ValueError, r"weight must be 2-D"),
        (lambda h, w, b, y: (h, w[None], b, y), ValueError, r"weight must be 2-D"),
        (lambda h, w, b, y: (h, w, b[:29], y), ValueError, r"bias must have shape \(30,\)"),
        (lambda h, w, b, y: (h, w, b, y[:4]), ValueError, r"labels shape"),
        (lambda h, w, b, y: (h, w.astype(np.float64), b, y), TypeError, r"weight dtype float64 differs"),
        (lambda h, w, b, y: (h, w, b.astype(np.float64), y), TypeError, r"bias dtype float64 differs"),
        (lambda h, w, b, y: (h.astype(np.int32), w, b, y), TypeError, r"hidden must be float16"),
        (lambda h, w, b, y: (h, w, b, y.astype(np.float32)), TypeError, r"labels must be integers"),
        (lambda h, w, b, y: (h, w, b, np.where(np.arange(5) == 3, 30, y)), ValueError, r"label 30 at position \(3,\)"),
        (lambda h, w, b, y: (h, w[:0], None, y), ValueError, r"weight has no classes"),
    ],
)
def test_bad_input(rng, change, error, match):
    hidden, weight, bias, labels = change(*_bad_inputs(rng))
    for function in (fastxent.linear_cross_entropy, fastxent.linear_cross_entropy_with_grad):
        with pytest.raises(error, match=match):
            function(hidden, weight, labels, bias=bias)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"reduction": "avg"}, "unknown reduction"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"block_rows": 0}, "block_rows must be a positive integer"),
        ({"memory_budget": -1}, "memory_budget must be a positive integer"),
        ({"block_classes": 2.5}, "block_classes must be a positive integer"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"threads": True}, "threads must be a positive integer"),
        ({"class_weight": np.ones(29)}, r"class_weight must have one entry per class, shape \(30,\)"),
    ],
)
def test_bad_options(rng, options, match):
    hidden, weight, bias, labels = _bad_inputs(rng)
    with pytest.raises(ValueError, match=match):
        fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **options)


# ----------------------------------------------------------------------------------------
# Blocks and the BLAS accumulation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows, num_classes", [(2048, 128256), (1024, 32000), (100_000, 262_144), (7, 50)])
def test_default_blocks_hold_at_most_an_eighth_of_the_logits(num_rows, num_classes):
    blocks = plan_linear_blocks(num_rows, num_classes, np.float32)
    logits_bytes = num_rows * num_classes * 4
    chunk_bytes = blocks.grad_rows * num_classes * 4
    assert chunk_bytes <= max(logits_bytes // 8, num_classes * 4)
    assert chunk_bytes <= _linear.DEFAULT_MEMORY_BUDGET
    assert blocks.rows * blocks.classes * 4 <= max(_linear.CACHE_BLOCK_BYTES, logits_bytes)


def test_workers_only_for_large_problems():
    assert plan_linear_blocks(64, 1000, np.float32, features=24, max_workers=4).workers == 1
    assert plan_linear_blocks(2048, 128256, np.float32, features=512, max_workers=4).workers == 4
    assert plan_linear_blocks(2048, 128256, np.float32, features=512, max_workers=4, threads=2).workers == 2
    assert plan_linear_blocks(64, 1000, np.float32, features=24, max_workers=1, threads=3).workers == 3


def test_threads_default_to_blas(monkeypatch, rng):
    """A large call without ``threads`` shares the work among BLAS's thread count of workers,
    and gives the same numbers as one thread."""
    from fastxent.cpu import linear as cpu_linear

    seen = []
    real = _linear.run_workers
    monkeypatch.setattr(_linear, "run_workers", lambda count, *args: (seen.append(count), real(count, *args)))
    monkeypatch.setattr(_linear, "PARALLEL_MIN_WORK", 1)
    monkeypatch.setattr(cpu_linear, "max_workers", lambda: 3)
    hidden, weight, bias, labels, options = linear_case(rng, "plain", np.float64)
    many = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, block_rows=8)
    one = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, block_rows=8, threads=1)
    assert seen == [3, 1]
    assert_loss_close(many[0], one[0], np.float64)
    for got, ref in zip(many[1:], one[1:], strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_failing_worker_stops_the_others(failing):
    """The worker's own error reaches the caller (not the broken barrier it leaves behind),
    and no other worker is left waiting at the barrier."""
    finished = []

    def work(index, barrier):
        for step in range(3):
            if index == failing and step == 1:
                raise KeyError(f"worker {index}")
            barrier.wait()
        finished.append(index)

    with pytest.raises(KeyError, match=f"worker {failing}"):
        _linear.run_workers(3, contextlib.nullcontext, work)
    assert finished == []


def test_single_threaded_blas_is_counted_and_restored():
    if not blas.has_thread_control():
        pytest.skip("NumPy's BLAS offers no thread control here")
    before = blas.num_threads()
    with blas.single_threaded():
        assert blas.num_threads() == 1
        with blas.single_threaded():
            assert blas.num_threads() == 1
        # The inner block leaving does not restore the count while the outer one runs.
        assert blas.num_threads() == 1
    assert blas.num_threads() == before
    # Overlapping uses from two threads: the count comes back only after both have left.
    inside, leave = threading.Event(), threading.Event()

    def other():
        with blas.single_threaded():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(10)
    with blas.single_threaded():
        pass
    assert blas.num_threads() == 1
    leave.set()
    thread.join()
    assert blas.num_threads() == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("use_cblas", [True, False])
def test_accumulate_at_b(rng, dtype, use_cblas):
    if use_cblas and not blas.has_cblas():
        pytest.skip("NumPy's BLAS has no CBLAS entry found here")
    a = rng.standard_normal((40, 2500)).astype(dtype)
    b = rng.standard_normal((40, 9)).astype(dtype)
    c = rng.standard_normal((3000, 9)).astype(dtype)
    expected = c[100:2600].astype(np.float64) + a.T.astype(np.float64) @ b
    blas.accumulate_at_b(a, b, c[100:2600], use_cblas=use_cblas)
    np.testing.assert_allclose(c[100:2600], expected, rtol=1e-5, atol=1e-4 if dtype == np.float32 else 1e-12)


# ----------------------------------------------------------------------------------------
# Half precision: at least as accurate as the unfused computation in the same dtype
# ----------------------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16], ids=dtype_id)
def test_half_precision_at_least_naive_accuracy(rng, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    hidden, weight, bias, labels, options = linear_case(rng, "plain", dtype)
    torch_dtype = torch.float16 if dtype == np.float16 else torch.bfloat16
    tensors = [torch.tensor(a.astype(np.float32)).to(torch_dtype).requires_grad_() for a in (hidden, weight, bias)]
    naive_loss = F.cross_entropy(F.linear(*tensors).reshape(-1, NUM_CLASSES).float(), torch.tensor(labels.reshape(-1)))
    naive_loss.backward()
    naive = [naive_loss.detach().numpy()] + [t.grad.float().numpy() for t in tensors]
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias)
    got = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **SMALL_BLOCKS)
    assert got[0].dtype == np.float32 and all(g.dtype == np.dtype(dtype) for g in got[1:])
    assert_at_least_naive_accuracy(got[0], ref[0], naive[0], dtype, "loss")
    for g, r, n in zip(got[1:], ref[1:], naive[1:], strict=True):
        assert_at_least_naive_accuracy(g, r, n, dtype, "grad")


# ----------------------------------------------------------------------------------------
# Against PyTorch
# ----------------------------------------------------------------------------------------


TORCH_OPTIONS = ("plain", "ignore_index", "label_smoothing", "class_weight", "smoothing_and_class_weight")


def _torch_options(options):
    """fastxent's options in F.cross_entropy's names (the subset PyTorch has)."""
    import torch

    translated = {"label_smoothing": options.get("label_smoothing", 0.0)}
    if "ignore_index" in options:
        translated["ignore_index"] = options["ignore_index"]
    if "class_weight" in options:
        translated["weight"] = torch.tensor(options["class_weight"], dtype=torch.float32)
    return translated


@pytest.mark.peers
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", TORCH_OPTIONS)
@pytest.mark.parametrize("fused_peer", [False, True], ids=["unfused", "F.linear_cross_entropy"])
def test_matches_torch(rng, option, reduction, fused_peer):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    if fused_peer and not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this PyTorch has no F.linear_cross_entropy")
    hidden, weight, bias, labels, options = linear_case(rng, option, np.float32)
    tensors = [torch.tensor(a).requires_grad_() for a in (hidden, weight, bias)]
    flat_hidden = tensors[0].reshape(-1, FEATURES)
    target = torch.tensor(labels.reshape(-1))
    peer_options = dict(_torch_options(options), reduction=reduction)
    if fused_peer:
        class_weight = peer_options.pop("weight", None)
        peer = F.linear_cross_entropy(
            flat_hidden, tensors[1], target, linear_bias=tensors[2], weight=class_weight, **peer_options
        )
    else:
        peer = F.cross_entropy(F.linear(flat_hidden, tensors[1], tensors[2]), target, **peer_options)
    peer.sum().backward()
    loss, *grads = fastxent.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, reduction=reduction, **options, **SMALL_BLOCKS
    )
    np.testing.assert_allclose(loss.reshape(-1), peer.detach().numpy().reshape(-1), rtol=1e-5, atol=1e-5)
    for got, tensor in zip(grads, tensors, strict=True):
        expected = tensor.grad.numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))
