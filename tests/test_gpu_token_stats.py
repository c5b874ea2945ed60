"""fastxent.token_stats on CuPy arrays (the CUDA kernels) against the float64 reference and the
CPU backend. Skipped where CuPy is missing or sees no device; in CI the host emulator
(tools/gpu_emulator) runs it (tests/test_cuda_compile.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (  # noqa: E402
    BFLOAT16,
    assert_grad_close,
    assert_loss_close,
    cuda_device_count,
    cupy_with_a_device,
    dtype_id,
    random_labels,
    random_logits,
)

cupy = cupy_with_a_device()


def _device_count() -> int:
    return cuda_device_count(cupy)


import fastxent  # noqa: E402
from fastxent import reference  # noqa: E402
from fastxent.gpu import stats as gpu_stats  # noqa: E402

pytestmark = pytest.mark.gpu


def _has_bfloat16() -> bool:
    try:
        cupy.empty(1, dtype=BFLOAT16)
        return True
    except Exception:
        return False


DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + ([BFLOAT16] if _has_bfloat16() else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("temperature, softcap", [(1.0, None), (0.7, 3.0)])
def test_token_stats_match_reference(rng, dtype, temperature, softcap):
    num_rows, num_classes = 4, 301  # not a multiple of any vector width: head, vectors, tail
    logits = random_logits(rng, (num_rows, num_classes), dtype)
    labels = random_labels(rng, (num_rows,), num_classes)
    logits[0, ::3] = -np.inf  # masked classes
    labels[0] = 1
    logits[1, [4, 200]] = np.asarray(40.0, dtype)  # a tie: the lower index
    labels[3] = -100
    a, b, c = rng.standard_normal((3, num_rows))
    options = dict(temperature=temperature, softcap=softcap, ignore_index=-100)
    got, grad = fastxent.token_stats_with_grad(cupy.asarray(logits), cupy.asarray(labels), a, b, c, **options)
    ref, ref_grad = reference.token_stats_with_grad(logits, labels, a, b, c, **options)
    for value, expected in zip(got[:3], ref[:3], strict=True):
        assert isinstance(value, cupy.ndarray)
        assert_loss_close(cupy.asnumpy(value), expected, dtype)
    np.testing.assert_array_equal(cupy.asnumpy(got.argmax), ref[3])
    assert cupy.asnumpy(got.argmax)[1] == 4
    scale = (np.abs(a).max() + np.abs(b).max() * np.log(num_classes) + np.abs(c).max()) / temperature
    assert_grad_close(cupy.asnumpy(grad), ref_grad, dtype, scale=scale)
    # The CPU backend gives the same statistics.
    cpu = fastxent.token_stats(logits, labels, **options)
    np.testing.assert_array_equal(cupy.asnumpy(got.argmax), cpu.argmax)
    np.testing.assert_allclose(cupy.asnumpy(got.lse), cpu.lse, rtol=1e-5)


def test_edges_and_class_range_labels():
    inf, nan = np.inf, np.nan
    logits = np.array([[-inf, -inf, -inf], [0.0, nan, 1.0], [1.0, inf, 2.0], [1e30, 1e30, -1e30]], np.float32)
    labels = np.array([0, 2, 0, 1])
    got = fastxent.token_stats(cupy.asarray(logits), cupy.asarray(labels))
    ref = reference.token_stats(logits, labels)
    np.testing.assert_array_equal(cupy.asnumpy(got.argmax), ref[3])
    for value, expected in zip(got[:3], ref[:3], strict=True):
        np.testing.assert_allclose(cupy.asnumpy(value), expected, rtol=1e-6, equal_nan=True)
    # A label outside the range (its target elsewhere): no target value, a sweep without it.
    rows = cupy.asarray(logits[3:])
    stats = gpu_stats.token_row_stats(rows, cupy.asarray([-2]), 1.0, None)
    assert float(stats.target_value[0]) == 0.0
    np.testing.assert_allclose(float(stats.sum_exp[0]), 2.0, rtol=1e-6)
    grad = gpu_stats.token_grad(rows, cupy.asarray([-2]), stats, [0.0], [0.0], [1.0], 1.0, None)
    np.testing.assert_allclose(cupy.asnumpy(grad)[0], [0.5, 0.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)], ids=dtype_id)
def test_linear_token_stats_on_the_device(rng, dtype):
    """``linear_token_stats`` on CuPy arrays: chunks of whole rows (a GEMM, then the statistics
    kernel) give the CPU path's values, argmax exactly; the backward's gradients of hidden,
    weight and bias match the CPU's; forward and backward read nothing back from the device."""
    from fastxent import _linear_api

    hidden = rng.standard_normal((3, 5, 16)).astype(dtype)
    weight = (rng.standard_normal((301, 16)) * 0.4).astype(dtype)
    bias = (rng.standard_normal(301) * 0.3).astype(dtype)
    bias[7] = -np.inf  # a masked class
    labels = rng.integers(0, 301, (3, 5))
    labels[1, 3] = -100
    options = dict(temperature=0.8, softcap=5.0, ignore_index=-100)
    a, b, c = (rng.standard_normal((3, 5)) for _ in range(3))
    cpu = _linear_api.linear_token_stats_forward(hidden, weight, labels, bias=bias, **options)
    cpu_grads = _linear_api.linear_token_stats_backward(hidden, weight, cpu, a, b, c, bias=bias)
    on_device = [cupy.asarray(x) for x in (hidden, weight, bias)]
    reads = cupy.host_reads() if getattr(cupy, "EMULATED", False) else None
    gpu = _linear_api.linear_token_stats_forward(
        on_device[0], on_device[1], labels, bias=on_device[2], block_rows=4, **options
    )
    gpu_grads = _linear_api.linear_token_stats_backward(
        on_device[0], on_device[1], gpu, a, b, c, bias=on_device[2], memory_budget=4 * 301 * 4
    )
    if reads is not None:
        assert cupy.host_reads() == reads
    rtol = 1e-12 if dtype == np.float64 else 1e-5 if dtype == np.float32 else 2e-3
    for got, expected in zip(gpu.values[:3], cpu.values[:3], strict=True):
        assert type(got).__module__.split(".")[0] == "cupy" and got.dtype == expected.dtype
        np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(cupy.asnumpy(gpu.values.argmax), cpu.values.argmax)
    for got, expected in zip(gpu_grads, cpu_grads, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        scale = float(np.max(np.abs(expected.astype(np.float64))))
        np.testing.assert_allclose(
            cupy.asnumpy(got).astype(np.float64), expected.astype(np.float64), rtol=rtol * 10, atol=rtol * 10 * scale
        )
