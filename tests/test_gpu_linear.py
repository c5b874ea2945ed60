"""fastxent.linear_cross_entropy[_with_grad] on CuPy arrays: the GPU launcher against the float64
composition and against the CPU path.

Skipped as a whole where CuPy is missing or sees no device; in CI it runs on the host emulator
(tools/gpu_emulator) from tests/test_cuda_compile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (  # noqa: E402
    BFLOAT16,
    OPTION_NAMES,
    REDUCTIONS,
    assert_at_least_naive_accuracy,
    assert_loss_close,
    cuda_device_count,
    cupy_with_a_device,
    dtype_id,
    make_case,
    tolerance,
)

cupy = cupy_with_a_device()


def _device_count() -> int:
    return cuda_device_count(cupy)


import fastxent  # noqa: E402
from fastxent import reference  # noqa: E402

pytestmark = pytest.mark.gpu

NUM_CLASSES = 300
FEATURES = 16
LEAD_SHAPE = (3, 5)
# Chunks of 4 rows: 15 rows cross four chunks, the last one short.
BLOCKS = {"block_rows": 4}


def layer(rng, dtype, *, bias=True, num_classes=NUM_CLASSES):
    hidden = rng.standard_normal(LEAD_SHAPE + (FEATURES,)).astype(dtype)
    weight = (rng.standard_normal((num_classes, FEATURES)) / np.sqrt(FEATURES) * 2.0).astype(dtype)
    bias_values = (rng.standard_normal(num_classes) * 0.5).astype(dtype) if bias else None
    return hidden, weight, bias_values


def to_device(*arrays):
    return tuple(None if a is None else cupy.asarray(a) for a in arrays)


def assert_grad_close(got, ref, dtype):
    assert type(got).__module__.split(".")[0] == "cupy", type(got)
    assert got.dtype == np.dtype(dtype)
    magnitude = float(np.max(np.abs(ref), initial=0.0))
    atol = (1e-12 if np.dtype(dtype) == np.float64 else 2e-6) * max(magnitude, 1e-4)
    np.testing.assert_allclose(
        cupy.asnumpy(got).astype(np.float64), ref, rtol=tolerance(dtype).grad_rtol * 5, atol=atol
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTION_NAMES)
def test_matches_float64_composition(rng, option, reduction, dtype):
    _, labels, options = make_case(rng, option, LEAD_SHAPE, NUM_CLASSES, np.float32)
    options["reduction"] = reduction
    hidden, weight, bias = layer(rng, dtype)
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **options)
    d_hidden, d_weight, d_bias = to_device(hidden, weight, bias)
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        d_hidden, d_weight, cupy.asarray(labels), bias=d_bias, **options, **BLOCKS
    )
    assert type(loss).__module__.split(".")[0] == "cupy"
    assert_loss_close(cupy.asnumpy(loss), ref[0], dtype, scale=10.0)
    for got, want in zip((grad_hidden, grad_weight, grad_bias), ref[1:], strict=True):
        assert_grad_close(got, want, dtype)
    loss_only = fastxent.linear_cross_entropy(d_hidden, d_weight, labels, bias=d_bias, **options, **BLOCKS)
    assert_loss_close(cupy.asnumpy(loss_only), ref[0], dtype, scale=10.0)


def test_agrees_with_the_cpu_path(rng):
    hidden, weight, bias = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    host = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, label_smoothing=0.1)
    device = fastxent.linear_cross_entropy_with_grad(
        *to_device(hidden, weight), labels, bias=cupy.asarray(bias), label_smoothing=0.1
    )
    np.testing.assert_allclose(cupy.asnumpy(device[0]), host[0], rtol=1e-5)
    for got, want in zip(device[1:], host[1:], strict=True):
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-4, atol=1e-6)


HALF_DTYPES = [np.float16] + ([BFLOAT16] if BFLOAT16 else [])


def naive_in_dtype(hidden, weight, bias, labels, dtype):
    """The unfused computation in ``dtype``: each GEMM accumulates in float32 and rounds its
    output to ``dtype`` (as cuBLAS does for half operands), the cross-entropy and its gradient
    (float64) see the rounded logits, and the gradient is rounded before the backward GEMMs."""
    f32 = np.float32
    logits = (hidden.astype(f32) @ weight.astype(f32).T + bias.astype(f32)).astype(dtype)
    loss, grad = reference.sparse_cross_entropy_with_grad(logits.astype(np.float64), labels, ignore_index=-100)
    grad = grad.astype(dtype).astype(f32)
    d_hidden = (grad @ weight.astype(f32)).astype(dtype)
    d_weight = (grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]).astype(f32)).astype(dtype)
    return loss, d_hidden, d_weight, grad.reshape(-1, grad.shape[-1]).sum(axis=0).astype(dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_gemms_take_half_operands(rng, dtype):
    """float16/bfloat16 layers: every GEMM gets the input-type operands (no float32 copy of W or
    X) with a float32 output, and the results are at least as accurate as the unfused
    computation in that type against the float64 reference."""
    hidden, weight, bias = layer(rng, dtype)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    labels[0, 1] = -100
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, ignore_index=-100)
    naive = naive_in_dtype(hidden, weight, bias, labels, dtype)
    before = len(cupy.gemm_calls())
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        *to_device(hidden, weight), labels, bias=cupy.asarray(bias), ignore_index=-100, **BLOCKS
    )
    calls = cupy.gemm_calls()[before:]
    name = np.dtype(dtype).name
    # Four chunks, three GEMMs each, all mixed precision.
    assert calls == [("gemmEx", name, name, "float32")] * 12, calls
    assert loss.dtype == np.float32
    assert_at_least_naive_accuracy(cupy.asnumpy(loss), ref[0], naive[0], dtype, "loss")
    # dX and dW: the chunk's gradient is rounded to the input type for the GEMMs, as in the
    # unfused computation (and PyTorch's): no worse than it normwise. (Elementwise the two
    # differ by chance: each entry is a sum of the gradient's rounding errors, which fall
    # differently, and entries near zero from cancellation have no relative slack.)
    half_ulp = tolerance(dtype).half_ulp
    for got, want, unfused in zip((grad_hidden, grad_weight), ref[1:3], naive[1:3], strict=True):
        assert got.dtype == np.dtype(dtype)
        got_error = np.abs(cupy.asnumpy(got).astype(np.float64) - want)
        naive_error = np.abs(unfused.reshape(want.shape).astype(np.float64) - want)
        assert got_error.max() <= 1.25 * naive_error.max(), (got_error.max(), naive_error.max())
        assert got_error.max() <= 4 * half_ulp * np.abs(want).max()
    # The bias gradient sums the float32 gradient: the accuracy rule as it stands.
    assert grad_bias.dtype == np.dtype(dtype)
    assert_at_least_naive_accuracy(cupy.asnumpy(grad_bias), ref[3], naive[3], dtype, "grad")
    before = len(cupy.gemm_calls())
    loss_only = fastxent.linear_cross_entropy(
        *to_device(hidden, weight), labels, bias=cupy.asarray(bias), ignore_index=-100, **BLOCKS
    )
    assert cupy.gemm_calls()[before:] == [("gemmEx", name, name, "float32")] * 4
    assert_loss_close(cupy.asnumpy(loss_only), ref[0], np.float32, scale=10.0)


@pytest.mark.parametrize("with_grad", [False, True])
def test_no_host_reads_per_chunk(rng, with_grad):
    """A call reads nothing back from the device whatever the number of chunks: per-row losses
    and statistics stay on the device (device labels come over once for their checks)."""
    if not hasattr(cupy, "host_reads"):
        pytest.skip("the host emulator counts the reads")
    hidden = cupy.asarray(rng.standard_normal((64, FEATURES)).astype(np.float32))
    weight = cupy.asarray(rng.standard_normal((NUM_CLASSES, FEATURES)).astype(np.float32))
    labels = rng.integers(0, NUM_CLASSES, 64)
    call = fastxent.linear_cross_entropy_with_grad if with_grad else fastxent.linear_cross_entropy
    for block_rows in (8, 64):
        for device_labels in (False, True):
            before = cupy.host_reads()
            call(hidden, weight, cupy.asarray(labels) if device_labels else labels, block_rows=block_rows)
            assert cupy.host_reads() - before <= (1 if device_labels else 0) <= 2, (block_rows, device_labels)


def test_planner_sizes_chunks_from_free_memory(monkeypatch):
    from fastxent.gpu import linear as gpu_linear

    monkeypatch.delenv(gpu_linear.BUDGET_ENV, raising=False)
    free = 6 << 30  # a device with 6 GiB free: half of it
    monkeypatch.setattr(cupy.cuda.runtime, "memGetInfo", lambda: (free, 80 << 30))
    budget = 3 << 30
    vocab = 128256
    blocks = gpu_linear.plan(10**6, vocab, np.float32)
    assert blocks.grad_rows == blocks.rows == budget // (vocab * 4) // 16 * 16 and blocks.classes == vocab
    # Half precision with gradients also holds the chunk's rounded gradient (2 bytes a class).
    assert gpu_linear.plan(10**6, vocab, np.float16).grad_rows == budget // (vocab * 6) // 16 * 16
    assert gpu_linear.plan(10**6, vocab, np.float16, want_grads=False).grad_rows == blocks.grad_rows
    assert gpu_linear.plan(100, vocab, np.float32).grad_rows == 100
    free = 60 << 30  # plenty free: the default cap, several GB rather than the CPU's 256 MiB
    assert gpu_linear.plan(10**6, vocab, np.float32).grad_rows == gpu_linear.DEFAULT_BUDGET // (vocab * 4) // 16 * 16
    assert gpu_linear.DEFAULT_BUDGET >= 4 << 30
    assert gpu_linear.plan(8192, vocab, np.float32, memory_budget=vocab * 4 * 40).grad_rows == 32
    assert gpu_linear.plan(8192, vocab, np.float32, block_rows=5).grad_rows == 5
    monkeypatch.setenv(gpu_linear.BUDGET_ENV, str(vocab * 4 * 64))
    assert gpu_linear.plan(8192, vocab, np.float32).grad_rows == 64
    monkeypatch.setenv(gpu_linear.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=gpu_linear.BUDGET_ENV):
        gpu_linear.plan(8192, vocab, np.float32)
    if hasattr(cupy, "gemm_calls"):  # the public call plans with the budget: 64 rows in 16-row chunks
        monkeypatch.delenv(gpu_linear.BUDGET_ENV)
        hidden = cupy.zeros((64, FEATURES), dtype=np.float32)
        weight = cupy.zeros((NUM_CLASSES, FEATURES), dtype=np.float32)
        before = len(cupy.gemm_calls())
        fastxent.linear_cross_entropy(hidden, weight, np.zeros(64, np.int64), memory_budget=NUM_CLASSES * 4 * 16)
        assert len(cupy.gemm_calls()) - before == 4


def test_skipped_gradients_and_no_bias(rng):
    hidden, weight, _ = layer(rng, np.float64, bias=False)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    d_hidden, d_weight = to_device(hidden, weight)
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        d_hidden, d_weight, labels, weight_grad=False
    )
    assert grad_weight is None and grad_bias is None
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels)
    assert_grad_close(grad_hidden, ref[1], np.float64)


def test_inputs_are_not_modified(rng):
    hidden, weight, bias = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    device = to_device(hidden, weight, bias)
    fastxent.linear_cross_entropy_with_grad(device[0], device[1], labels, bias=device[2], **BLOCKS)
    for before, after in zip((hidden, weight, bias), device, strict=True):
        np.testing.assert_array_equal(cupy.asnumpy(after), before)


def test_host_and_device_arrays_do_not_mix(rng):
    hidden, weight, bias = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    with pytest.raises(TypeError, match="all be NumPy arrays or all CuPy arrays; got hidden CuPy, weight ndarray"):
        fastxent.linear_cross_entropy(cupy.asarray(hidden), weight, labels)
    with pytest.raises(TypeError, match="bias ndarray"):
        fastxent.linear_cross_entropy(cupy.asarray(hidden), cupy.asarray(weight), labels, bias=bias)


@pytest.mark.skipif(_device_count() < 2, reason="needs two devices")
def test_arrays_on_two_devices_are_rejected(rng):
    hidden, weight, _ = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    d_hidden = cupy.asarray(hidden)
    with cupy.cuda.Device(1):
        d_weight = cupy.asarray(weight)
    with pytest.raises(ValueError, match="on one device"):
        fastxent.linear_cross_entropy(d_hidden, d_weight, labels)


@pytest.mark.skipif(_device_count() < 2, reason="needs two devices")
def test_runs_on_the_arrays_device(rng):
    """With device 0 current, arrays on device 1 give results on device 1."""
    hidden, weight, bias = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    with cupy.cuda.Device(1):
        device = to_device(hidden, weight, bias)
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        device[0], device[1], labels, bias=device[2], **BLOCKS
    )
    for result in (loss, grad_hidden, grad_weight, grad_bias):
        assert int(result.device.id) == 1
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias)
    assert_loss_close(cupy.asnumpy(loss), ref[0], np.float32, scale=10.0)


def test_bad_labels_name_value_and_position(rng):
    hidden, weight, _ = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    labels[1, 2] = NUM_CLASSES
    with pytest.raises(ValueError, match=rf"{NUM_CLASSES}.*\(1, 2\)"):
        fastxent.linear_cross_entropy(*to_device(hidden, weight), cupy.asarray(labels))


def test_warm_up_loads_the_kernels_of_the_dtypes(monkeypatch):
    from fastxent import gpu
    from fastxent.gpu import xent

    loaded = []
    original = xent.get_kernel

    def recording(name):
        kernel = original(name)  # compiles the module for the device on first use
        loaded.append((name, cupy.cuda.runtime.getDevice(), kernel))
        return kernel

    monkeypatch.setattr(xent, "get_kernel", recording)
    from fastxent.gpu import _names

    device = _device_count() - 1
    # Per dtype: every logit kernel with and without softcap, and the plain ones.
    per_dtype = 2 * len(_names.LOGIT_KINDS) + len(_names.PLAIN_KINDS)
    assert gpu.warm_up(["float32", np.float64], device=device) == 2 * per_dtype
    names = {name for name, _, _ in loaded}
    assert {"xent_fwd_bwd_float32", "xent_part_stats_softcap_float64", "xent_prob_float32"} <= names
    assert names <= set(_names.all_kernel_names())
    assert not any("float16" in name for name in names)  # only the dtypes asked for
    assert len(names) == 2 * per_dtype and {d for _, d, _ in loaded} == {device}
    assert all(kernel is not None for _, _, kernel in loaded)
    with pytest.raises(ValueError, match="no kernels for dtype 'int32'"):
        gpu.warm_up([np.int32])


def test_vocabulary_parallel_hidden_gradient_reduced_on_the_device(rng, monkeypatch):
    """fastxent.distributed.linear_cross_entropy_with_grad on device arrays over 3 ranks: dX is
    summed where it lies when the engine can (``allreduce_sum_on_device``, one call per rank),
    through a host copy when it cannot; both give the same bits on every rank, equal to one
    process's dX. A GEMM failing on one rank in the last chunk raises on every rank through the
    same reduction, none waits."""
    import threading
    import time

    from sharding import ThreadCommunicator, bounds, run_ranks

    from fastxent import distributed
    from fastxent.gpu.linear import CupyLinearOps

    class DeviceThreads(ThreadCommunicator):
        def allreduce_sum_on_device(self, array):
            self.device_reductions += 1
            host = cupy.asnumpy(array)
            self.allreduce_sum(host)
            array[...] = cupy.asarray(host)
            return True

    hidden, weight, bias = layer(rng, np.float32)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    starts = bounds((100, 120, 80))
    this_rank = threading.local()
    hidden_grad = CupyLinearOps.hidden_grad

    def failing_hidden_grad(self, *args):
        # The failing rank fails in the last chunk (15 rows, 4 a chunk): no collective of the
        # statistics comes after it, only dX's reduction carries the failure. (A ValueError:
        # the thread double releases its barrier at once for other types.)
        this_rank.calls += 1
        if this_rank.fails and this_rank.calls == 4:
            raise ValueError("injected failure of a GEMM")
        return hidden_grad(self, *args)

    monkeypatch.setattr(CupyLinearOps, "hidden_grad", failing_hidden_grad)

    def run(communicator, fail_rank=None):
        def work(comm):
            comm.__class__ = communicator
            comm.device_reductions = 0
            this_rank.fails, this_rank.calls = comm.rank == fail_rank, 0
            lo, hi = starts[comm.rank], starts[comm.rank + 1]
            h, w, b = to_device(hidden, weight[lo:hi], bias[lo:hi])
            result = distributed.linear_cross_entropy_with_grad(
                h, w, labels, vocab_start=lo, group=comm, bias=b, **BLOCKS
            )
            return cupy.asnumpy(result[1]), comm.device_reductions

        return run_ranks(3, work)

    on_device = run(DeviceThreads)
    via_host = run(ThreadCommunicator)
    expected = fastxent.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias)[1]
    for (grad_device, reductions), (grad_host, host_reductions) in zip(on_device, via_host, strict=True):
        assert reductions == 1 and host_reductions == 0
        np.testing.assert_array_equal(grad_device, grad_host)
        np.testing.assert_array_equal(grad_device, on_device[0][0])
        np.testing.assert_allclose(grad_device, expected, rtol=1e-5, atol=1e-6)
    started = time.monotonic()
    failed = run(DeviceThreads, fail_rank=1)
    # Every rank raised, well before the double's 60 s barrier timeout. (Which message each rank
    # shows depends on thread timing: the double releases its barrier when a rank raises.)
    assert all(isinstance(outcome, Exception) for outcome in failed), failed
    assert time.monotonic() - started < 30
    messages = " ".join(str(outcome) for outcome in failed)
    assert "injected failure" in messages or "1 other rank(s) failed" in messages, failed
