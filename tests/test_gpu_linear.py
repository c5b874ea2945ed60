"""fastxent.linear_cross_entropy[_with_grad] on CuPy arrays: the GPU launcher against the float64
composition and against the CPU path.

Skipped as a whole where CuPy is missing or sees no device; in CI it runs on the host emulator
(tools/gpu_emulator) from tests/test_cuda_compile.py.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

REQUIRE_GPU = os.environ.get("FASTXENT_REQUIRE_GPU") == "1"
cupy = importlib.import_module("cupy") if REQUIRE_GPU else pytest.importorskip("cupy")


def _device_count() -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError without a driver, or a broken install
        return 0


if _device_count() == 0:
    if REQUIRE_GPU:
        raise RuntimeError("FASTXENT_REQUIRE_GPU=1 but CuPy sees no CUDA device")
    pytest.skip("CuPy sees no CUDA device", allow_module_level=True)

from conftest import OPTION_NAMES, REDUCTIONS, assert_loss_close, dtype_id, make_case, tolerance  # noqa: E402

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


@pytest.mark.parametrize("dtype", [np.float16], ids=dtype_id)
def test_half_precision_computes_in_float32(rng, dtype):
    hidden, weight, bias = layer(rng, dtype)
    labels = rng.integers(0, NUM_CLASSES, LEAD_SHAPE)
    ref = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias)
    loss, grad_hidden, grad_weight, grad_bias = fastxent.linear_cross_entropy_with_grad(
        *to_device(hidden, weight), labels, bias=cupy.asarray(bias), **BLOCKS
    )
    assert loss.dtype == np.float32
    # float32 arithmetic, one rounding to float16 at the end: within float16's half ulp of the reference.
    np.testing.assert_allclose(float(cupy.asnumpy(loss)), ref[0], rtol=1e-5)
    for got, want in zip((grad_hidden, grad_weight, grad_bias), ref[1:], strict=True):
        assert got.dtype == np.float16
        np.testing.assert_allclose(cupy.asnumpy(got).astype(np.float64), want, rtol=2**-10, atol=1e-7)


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
