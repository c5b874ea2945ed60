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
