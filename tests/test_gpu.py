"""The CUDA backend against the float64 reference and against the CPU backend.

Skipped as a whole where CuPy is missing or sees no device. Every kernel path is forced in turn
(``gpu_path``): one block per row, the fused path with the row kept in shared memory (whole or
in part), and the split-row path; the launcher's own choice is recorded and checked so a
patched threshold cannot silently leave a test on the wrong path.

bfloat16 goes through the public API where the installed CuPy has a bfloat16 dtype, and through
the launcher with uint16 storage (``storage="bfloat16"``) everywhere.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
from conftest import (  # noqa: E402
    BFLOAT16,
    FLOAT_DTYPES,
    OPTION_NAMES,
    REDUCTIONS,
    assert_grad_close,
    cuda_device_count,
    cupy_with_a_device,
    dtype_id,
    loss_dtype_for,
    make_case,
    random_class_weight,
    random_labels,
    random_logits,
    random_probabilities,
    random_sample_weight,
    shape_id,
    tolerance,
)

cupy = cupy_with_a_device()


def _device_count() -> int:
    return cuda_device_count(cupy)


import fastxent  # noqa: E402
from fastxent import reference  # noqa: E402
from fastxent._options import KernelOptions  # noqa: E402
from fastxent.cpu import xent as cpu_xent  # noqa: E402
from fastxent.gpu import xent as gpu_xent  # noqa: E402

pytestmark = pytest.mark.gpu

# The host emulator (tools/gpu_emulator) stands in for CuPy in CI without a GPU: it runs every
# kernel, but neither huge inputs nor streams.
EMULATED = bool(getattr(cupy, "EMULATED", False))


def _cupy_has_bfloat16() -> bool:
    try:
        cupy.empty(1, dtype=BFLOAT16)
        return True
    except Exception:
        return False


CUPY_BFLOAT16 = _cupy_has_bfloat16()
API_DTYPES = tuple(
    d if d != BFLOAT16 or CUPY_BFLOAT16 else pytest.param(d, marks=pytest.mark.skip("CuPy has no bfloat16 dtype"))
    for d in FLOAT_DTYPES
)

# ----------------------------------------------------------------------------------------
# Kernel paths
# ----------------------------------------------------------------------------------------

GPU_PATHS = ("rows", "cached", "cached_partial", "split")


class PathRecorder:
    """Records the kernels the launcher asks for and the row plans it makes."""

    def __init__(self, monkeypatch):
        self.kernels = []
        self.plans = []
        get_kernel, plan_rows = gpu_xent.get_kernel, gpu_xent.plan_rows

        def recording_get_kernel(name):
            self.kernels.append(name)
            return get_kernel(name)

        def recording_plan_rows(num_rows, num_classes, itemsize, want_grad, *args, **kwargs):
            plan = plan_rows(num_rows, num_classes, itemsize, want_grad, *args, **kwargs)
            if want_grad:
                self.plans.append(plan)
            return plan

        monkeypatch.setattr(gpu_xent, "get_kernel", recording_get_kernel)
        monkeypatch.setattr(gpu_xent, "plan_rows", recording_plan_rows)

    def used(self, kind) -> bool:
        return any(name.startswith(f"xent_{kind}_") for name in self.kernels)


def force_gpu_path(monkeypatch, path: str) -> None:
    """rows: one block per row, no shared-memory cache. cached: fwd_bwd keeps each row in
    shared memory (a few hundred bytes of it with cached_partial, the rest from global memory).
    split: every row of 512 classes or more cut into parts of 256 classes."""
    monkeypatch.setattr(gpu_xent, "SPLIT_MIN_CLASSES", 0 if path == "split" else 2**62)
    if path == "split":
        monkeypatch.setattr(gpu_xent, "SPLIT_ROWS_PER_SM", 2**20)
        monkeypatch.setattr(gpu_xent, "SPLIT_PART_ALIGN", 256)
    monkeypatch.setattr(gpu_xent, "FUSED_CACHE_MIN_ROW_BYTES", 0 if path.startswith("cached") else 2**62)
    if path == "cached_partial":
        # A per-block share of 1/64 SM leaves about 1.5 KiB of cache after the reserves.
        monkeypatch.setattr(gpu_xent, "FUSED_BLOCKS_PER_SM", 64)


@pytest.fixture(params=GPU_PATHS)
def gpu_path(request, monkeypatch):
    force_gpu_path(monkeypatch, request.param)
    recorder = PathRecorder(monkeypatch)
    yield request.param, recorder


def assert_path(path_and_recorder, num_rows, num_classes, want_grad=True):
    """The launcher took the forced path (where the input allows it)."""
    path, recorder = path_and_recorder
    if num_rows == 0:
        return
    if path == "split" and num_classes >= 2 * gpu_xent.SPLIT_PART_ALIGN:
        assert recorder.used("part_stats")
        assert recorder.used("part_grad") == want_grad
    elif path != "split":
        assert not recorder.used("part_stats")
        if path.startswith("cached") and want_grad:
            cached = [plan.cache_vectors for plan in recorder.plans]
            assert cached and (num_classes < 64 or all(c > 0 for c in cached))


# ----------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------


def host(array) -> np.ndarray:
    return cupy.asnumpy(array) if isinstance(array, cupy.ndarray) else np.asarray(array)


def assert_loss_matches(got, ref, dtype):
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        host(got).astype(np.float64),
        np.asarray(ref, np.float64),
        rtol=tol.loss_rtol,
        atol=tol.loss_atol,
        equal_nan=True,
    )


def natural_gradient_size(
    labels, reduction="mean", ignore_index=None, class_weight=None, sample_weight=None, **_other
) -> float:
    """Largest row weight times the reduction's factor: the scale of absolute gradient errors."""
    labels = np.asarray(labels)
    flat = labels.reshape(-1)
    valid = np.ones(flat.shape, bool) if ignore_index is None else flat != ignore_index
    weight = np.ones(flat.shape)
    if class_weight is not None:
        weight = weight * np.asarray(class_weight, np.float64)[np.where(valid, flat, 0)]
    if sample_weight is not None:
        weight = weight * np.broadcast_to(np.asarray(sample_weight, np.float64), labels.shape).reshape(-1)
    weight = np.where(valid, weight, 0.0)
    denominator = {"mean": weight.sum(), "sum_over_batch_size": np.count_nonzero(valid)}.get(reduction, 1.0)
    return float(weight.max(initial=0.0) / denominator) if denominator else 0.0


def assert_grad_matches(got, ref, dtype, scale=0.0):
    """One unit in the last place of the storage type (relative), plus float32 compute error
    relative to the gradient's natural size; float16 also one subnormal step."""
    tol = tolerance(dtype)
    ref64 = np.asarray(ref, np.float64)
    finite = ref64[np.isfinite(ref64)]
    magnitude = max(float(np.max(np.abs(finite), initial=0.0)), scale)
    # A value beyond the storage type's range can only be stored as the infinity rounding gives.
    with np.errstate(over="ignore"):
        rounded = ref64.astype(dtype).astype(np.float64)
    ref64 = np.where(np.isinf(rounded) & np.isfinite(ref64), rounded, ref64)
    floor = 2.0**-24 if np.dtype(dtype) == np.float16 else 0.0
    np.testing.assert_allclose(
        host(got).astype(np.float64), ref64, rtol=tol.grad_rtol, atol=floor + tol.grad_atol * magnitude, equal_nan=True
    )


def to_device_options(options):
    return {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}


def check_gpu(logits, labels, *, inplace=False, **options):
    """Forward and forward+backward of host data on the GPU against the reference."""
    dtype = logits.dtype
    axis = options.get("axis", -1)
    lead_shape = tuple(np.delete(np.array(logits.shape, dtype=np.int64), axis % logits.ndim))
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, **options)
    device_logits, device_labels = cupy.asarray(logits), cupy.asarray(labels)
    device_options = to_device_options(options)

    loss = fastxent.sparse_cross_entropy(device_logits, device_labels, **device_options)
    assert isinstance(loss, cupy.ndarray)
    assert loss.dtype == loss_dtype_for(dtype)
    assert loss.shape == (lead_shape if options.get("reduction", "mean") == "none" else ())
    assert_loss_matches(loss, ref_loss, dtype)

    work = device_logits.copy() if inplace else device_logits
    loss_g, grad = fastxent.sparse_cross_entropy_with_grad(work, device_labels, inplace=inplace, **device_options)
    assert isinstance(grad, cupy.ndarray) and grad.dtype == dtype and grad.shape == logits.shape
    if inplace:
        assert grad is work
    else:
        assert host(device_logits).tobytes() == logits.tobytes(), "the logits were modified"
    assert_loss_matches(loss_g, ref_loss, dtype)
    assert_grad_matches(grad, ref_grad, dtype, natural_gradient_size(labels, **options))
    return host(loss), host(grad)


# ----------------------------------------------------------------------------------------
# Shapes and dtypes on every path
# ----------------------------------------------------------------------------------------

# Class counts: 1 (loss 0), 7 (shorter than one 16-byte vector of 16-bit types: scalar head and
# tail only), 1000 and 1029 (vectors plus a tail; 1029 * 2 bytes also misaligns most rows of
# 16-bit types), 4099 (several unrolled iterations per thread and a remainder), 33000 (a row
# longer than the 32 KiB fused threshold in float32).
CLASS_COUNTS = (1, 7, 1000, 1029, 4099, 33000)
LEAD_SHAPES = ((), (3,), (2, 3))


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", API_DTYPES, ids=dtype_id)
def test_shapes(rng, gpu_path, dtype, num_classes):
    lead_shape = LEAD_SHAPES[num_classes % len(LEAD_SHAPES)]
    logits = random_logits(rng, lead_shape + (num_classes,), dtype)
    labels = random_labels(rng, lead_shape, num_classes)
    reduction = REDUCTIONS[num_classes % len(REDUCTIONS)]
    check_gpu(logits, labels, reduction=reduction, inplace=num_classes % 2 == 1)
    assert_path(gpu_path, int(np.prod(lead_shape)), num_classes)


@pytest.mark.parametrize("lead_shape", LEAD_SHAPES, ids=shape_id)
def test_misaligned_views(rng, gpu_path, lead_shape):
    """Rows that start off a 16-byte boundary (a view into a larger buffer), gradient to a new
    buffer and in place."""
    num_classes = 1029
    num_rows = int(np.prod(lead_shape))
    base = cupy.asarray(random_logits(rng, (num_rows * num_classes + 3,), np.float16))
    view = base[3:].reshape(lead_shape + (num_classes,))
    assert view.data.ptr % 16 != 0
    logits = host(view)
    labels = random_labels(rng, lead_shape, num_classes)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels, reduction="sum")
    loss, grad = fastxent.sparse_cross_entropy_with_grad(view, cupy.asarray(labels), reduction="sum")
    assert grad.data.ptr % 16 == view.data.ptr % 16  # the launcher's aligned allocation
    assert_loss_matches(loss, ref_loss, np.float16)
    assert_grad_matches(grad, ref_grad, np.float16)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(view, cupy.asarray(labels), reduction="sum", inplace=True)
    assert grad is view
    assert_grad_matches(base[3:].reshape(view.shape), ref_grad, np.float16)


# ----------------------------------------------------------------------------------------
# Every option and reduction
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", OPTION_NAMES)
@pytest.mark.parametrize("dtype", API_DTYPES, ids=dtype_id)
def test_options(rng, gpu_path, dtype, option, reduction):
    lead_shape, num_classes = (2, 3), 2500
    logits, labels, options = make_case(rng, option, lead_shape, num_classes, dtype)
    check_gpu(logits, labels, reduction=reduction, inplace=reduction in ("sum", "none"), **options)
    assert_path(gpu_path, 6, num_classes)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "option", ("plain", "ignore_index", "label_smoothing", "class_weight", "sample_weight", "z_loss", "everything")
)
@pytest.mark.parametrize("dtype", API_DTYPES, ids=dtype_id)
def test_probabilities(rng, dtype, option, reduction):
    lead_shape, num_classes = (3, 4), 1000
    probs, labels, options = make_case(rng, option, lead_shape, num_classes, dtype, from_logits=False)
    probs.reshape(-1, num_classes)[0, labels.reshape(-1)[0]] = 0  # a zero target: loss 16.118
    tol_dtype = dtype
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
        probs, labels, from_logits=False, reduction=reduction, **options
    )
    device_options = to_device_options(options)
    device_probs = cupy.asarray(probs)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(
        device_probs, cupy.asarray(labels), from_logits=False, reduction=reduction, inplace=True, **device_options
    )
    assert grad is device_probs
    assert_loss_matches(loss, ref_loss, tol_dtype)
    assert_grad_matches(grad, ref_grad, tol_dtype, natural_gradient_size(labels, reduction=reduction, **options))


# ----------------------------------------------------------------------------------------
# Edge values (SEMANTICS "Edge values") on every path
# ----------------------------------------------------------------------------------------


def edge_rows(num_classes, dtype):
    """(logits (R, C), labels (R,)): one row per case of the SEMANTICS table."""
    rng = np.random.default_rng(7)
    rows = np.tile(rng.standard_normal(num_classes) * 3, (8, 1))
    labels = np.full(8, 5, dtype=np.int64)
    rows[0, ::3] = -np.inf  # some -inf, target finite (label 5 is not a multiple of 3)
    rows[1, 5] = -np.inf  # the target -inf: loss +inf
    rows[2, :] = -np.inf  # every class -inf: NaN
    rows[3, num_classes // 2] = np.inf  # +inf: NaN
    rows[4, num_classes - 1] = np.nan  # NaN at the end (the scalar tail): NaN
    rows[5, :] = 1e30 if dtype == np.float64 else 6e4  # huge, equal: loss ln C exactly
    rows[5, 5] = -(1e30 if dtype == np.float64 else 6e4)  # and the target far below: a huge loss
    rows[6, 0] = np.nan  # NaN at the start (the scalar head)
    rows[7, :] = 0.0  # all equal: loss ln C
    return rows.astype(dtype), labels


@pytest.mark.parametrize("dtype", API_DTYPES, ids=dtype_id)
def test_edge_values(gpu_path, dtype):
    num_classes = 1029
    logits, labels = edge_rows(num_classes, dtype)
    loss, _ = check_gpu(logits, labels, reduction="none")
    assert np.isfinite(loss[0]) and loss[1] == np.inf
    assert np.isnan(loss[2]) and np.isnan(loss[3]) and np.isnan(loss[4]) and np.isnan(loss[6])
    assert np.isfinite(loss[5])
    np.testing.assert_allclose(loss[7], np.log(num_classes), rtol=1e-6)


def test_zero_rows_and_all_ignored(gpu_path):
    empty = cupy.zeros((0, 5), dtype=cupy.float32)
    labels = cupy.zeros((0,), dtype=cupy.int64)
    assert host(fastxent.sparse_cross_entropy(empty, labels, reduction="none")).shape == (0,)
    assert float(fastxent.sparse_cross_entropy(empty, labels, reduction="sum")) == 0.0
    loss, grad = fastxent.sparse_cross_entropy_with_grad(empty, labels, reduction="mean")
    assert float(loss) == 0.0 and grad.shape == (0, 5)
    logits = cupy.full((3, 2500), cupy.nan, dtype=cupy.float32)
    ignored = cupy.full((3,), -100, dtype=cupy.int64)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, ignored, ignore_index=-100)
    assert float(loss) == 0.0 and not host(grad).any()


# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("shape,axis", (((1000, 5), 0), ((3, 2049, 4), 1), ((2, 3, 7), -1)), ids=str)
def test_class_axis(rng, gpu_path, shape, axis, inplace):
    logits = random_logits(rng, shape, np.float32)
    lead_shape = tuple(np.delete(np.array(shape), axis % len(shape)))
    labels = random_labels(rng, lead_shape, shape[axis])
    check_gpu(logits, labels, axis=axis, reduction="mean", inplace=inplace, label_smoothing=0.05)


def test_inplace_on_a_strided_view_writes_back(rng, gpu_path):
    base = cupy.asarray(random_logits(rng, (3, 2 * 2500), np.float32))
    untouched = host(base[:, 1::2])
    view = base[:, ::2]
    original = host(view)
    labels = random_labels(rng, (3,), 2500)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(original, labels, reduction="sum")
    loss, grad = fastxent.sparse_cross_entropy_with_grad(view, cupy.asarray(labels), reduction="sum", inplace=True)
    assert grad is view
    assert_loss_matches(loss, ref_loss, np.float32)
    assert_grad_matches(base[:, ::2], ref_grad, np.float32)
    assert host(base[:, 1::2]).tobytes() == untouched.tobytes()


# ----------------------------------------------------------------------------------------
# bfloat16 through the launcher (uint16 storage), and CPU-vs-GPU agreement of the launchers
# ----------------------------------------------------------------------------------------


def kernel_options(
    num_classes,
    *,
    from_logits=True,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    class_weight=None,
    grad_scale=0.5,
    xp=np,
):
    weights = None if class_weight is None else xp.asarray(class_weight, dtype=xp.float64)
    return KernelOptions(
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        class_weight=weights,
        class_weight_total=float(num_classes if class_weight is None else class_weight.sum()),
        num_classes=num_classes,
        grad_scale=grad_scale,
    )


LAUNCHER_OPTIONS = {
    "plain": {},
    "everything": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 7.0, "class_weight": True},
    "probabilities": {"from_logits": False, "label_smoothing": 0.05, "class_weight": True},
}


@pytest.mark.parametrize("inplace", (False, True), ids=("copy", "inplace"))
@pytest.mark.parametrize("option", tuple(LAUNCHER_OPTIONS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_launcher_agrees_with_cpu(rng, gpu_path, dtype, option, inplace):
    """The GPU launcher and the CPU launcher on the same data: losses to float32 rounding of
    the sums, gradients to one unit in the last place of the storage type."""
    num_rows, num_classes = 5, 3001
    settings = dict(LAUNCHER_OPTIONS[option])
    from_logits = settings.get("from_logits", True)
    if settings.pop("class_weight", False):
        settings["class_weight"] = random_class_weight(rng, num_classes)
    shape = (num_rows, num_classes)
    inputs = random_logits(rng, shape, dtype) if from_logits else random_probabilities(rng, shape, dtype)
    labels = random_labels(rng, (num_rows,), num_classes)
    labels[1] = -1  # an ignored row
    sample_weight = random_sample_weight(rng, (num_rows,))

    cpu_loss, cpu_grad, cpu_min = cpu_xent.fused_xent(
        inputs.copy(), labels, sample_weight, kernel_options(num_classes, **settings), want_grad=True
    )
    storage = "bfloat16" if dtype == BFLOAT16 else None
    device_inputs = cupy.asarray(inputs.view(np.uint16) if storage else inputs)
    gpu_loss, gpu_grad, gpu_min = gpu_xent.fused_xent(
        device_inputs,
        cupy.asarray(labels),
        cupy.asarray(sample_weight),
        kernel_options(num_classes, xp=cupy, **settings),
        want_grad=True,
        inplace=inplace,
        storage=storage,
    )

    assert isinstance(gpu_loss, cupy.ndarray) and gpu_loss.dtype == np.float64
    if inplace and from_logits:
        assert gpu_grad is device_inputs
    got_grad = host(gpu_grad).view(dtype) if storage else host(gpu_grad)
    tol = tolerance(dtype)
    np.testing.assert_allclose(host(gpu_loss), cpu_loss, rtol=4 * tol.loss_rtol, atol=tol.loss_atol)
    cpu_grad64 = cpu_grad.astype(np.float64)
    magnitude = float(np.max(np.abs(cpu_grad64[np.isfinite(cpu_grad64)]), initial=0.0))
    np.testing.assert_allclose(
        got_grad.astype(np.float64), cpu_grad64, rtol=2 * tol.grad_rtol, atol=2**-24 + 2 * tol.grad_atol * magnitude
    )
    assert not got_grad[1].any(), "an ignored row has a non-zero gradient"
    if from_logits:
        assert gpu_min is None and cpu_min is None
    else:
        np.testing.assert_array_equal(host(gpu_min), cpu_min)


@pytest.mark.parametrize("option", ("plain", "everything"))
@pytest.mark.parametrize("dtype", API_DTYPES, ids=dtype_id)
def test_public_api_cpu_and_gpu_agree(rng, dtype, option):
    """The same call on NumPy and on CuPy arrays gives the same loss and gradient."""
    logits, labels, options = make_case(rng, option, (4, 3), 5000, dtype)
    cpu_loss, cpu_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, **options)
    gpu_loss, gpu_grad = fastxent.sparse_cross_entropy_with_grad(
        cupy.asarray(logits), cupy.asarray(labels), **to_device_options(options)
    )
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        host(gpu_loss).astype(np.float64), np.float64(cpu_loss), rtol=4 * tol.loss_rtol, atol=tol.loss_atol
    )
    magnitude = float(np.max(np.abs(cpu_grad.astype(np.float64))))
    np.testing.assert_allclose(
        host(gpu_grad).astype(np.float64),
        cpu_grad.astype(np.float64),
        rtol=2 * tol.grad_rtol,
        atol=2**-24 + 2 * tol.grad_atol * magnitude,
    )


def test_default_dispatch_few_long_rows(rng):
    """Without patching, a few rows of a large vocabulary take the split-row path."""
    limits = gpu_xent.device_limits(cupy.cuda.runtime.getDevice())
    num_classes = max(gpu_xent.SPLIT_MIN_CLASSES, 40000)
    assert gpu_xent.use_split_rows(1, num_classes, limits)
    logits = random_logits(rng, (1, num_classes), np.float32)
    labels = random_labels(rng, (1,), num_classes)
    check_gpu(logits, labels, reduction="mean", z_loss=1e-4)


# ----------------------------------------------------------------------------------------
# Bad inputs: the same errors as on the CPU
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", (5, -1, 1000))
def test_label_out_of_range_raises(value):
    logits = cupy.zeros((2, 3, 5), dtype=cupy.float32)
    labels = cupy.zeros((2, 3), dtype=cupy.int64)
    labels[1, 2] = value
    with pytest.raises(ValueError, match=rf"label {value} at position \(1, 2\) is outside the valid range \[0, 5\)"):
        fastxent.sparse_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match=rf"label {value} at position \(1, 2\)"):
        fastxent.sparse_cross_entropy_with_grad(logits, labels, ignore_index=-100)


def test_negative_probability_raises(rng):
    probs = cupy.asarray(random_probabilities(rng, (3, 20), np.float32))
    probs[2, 4] = -0.5
    before = host(probs)
    with pytest.raises(ValueError, match=r"row \(2,\) has a negative value \(-0\.5\).*looks like logits"):
        fastxent.sparse_cross_entropy_with_grad(probs, cupy.asarray([1, 2, 3]), from_logits=False, inplace=True)
    assert host(probs).tobytes() == before.tobytes(), "rejected input was overwritten"


@pytest.mark.parametrize("value", (-1e-40, -1.4e-45, -np.inf))
def test_negative_subnormal_probability_raises(rng, value):
    """A negative subnormal "probability" is below 0 as on the CPU, though the kernels are
    compiled with flush-to-zero, where a float compare would see it as 0."""
    probs = random_probabilities(rng, (3, 20), np.float32)
    probs[1, 7] = 0.0
    probs[1, 4] = value
    labels = np.array([1, 2, 3])
    with pytest.raises(ValueError, match=r"row \(1,\) has a negative value"):
        fastxent.sparse_cross_entropy(probs, labels, from_logits=False)
    with pytest.raises(ValueError, match=r"row \(1,\) has a negative value"):
        fastxent.sparse_cross_entropy(cupy.asarray(probs), cupy.asarray(labels), from_logits=False)


def test_softcap_values_to_an_ulp(rng):
    """Softcapped values over the range where tanh's (1 - e) / (1 + e) form cancels (|x / s| in
    0.1-0.6), against float64: within 3e-7 relative, as the class-range tests need of them."""
    from fastxent import _range
    from fastxent.gpu import partial as gpu_partial

    cap = 4.0
    targets = np.concatenate([np.linspace(0.02, 0.7, 2000), -np.linspace(0.02, 0.7, 2000)]) * cap
    rows = np.zeros((targets.size, 4), np.float32)
    rows[:, 0] = targets
    local = _range.local_labels(np.zeros(targets.size, np.int64), 0, 4)
    options = KernelOptions(
        from_logits=True,
        label_smoothing=0.0,
        z_loss=0.0,
        softcap=cap,
        class_weight=None,
        class_weight_total=4.0,
        num_classes=4,
        grad_scale=1.0,
    )
    got = gpu_partial.range_stats(cupy.asarray(rows), local, options)
    exact = cap * np.tanh(rows[:, 0].astype(np.float64) / cap)
    np.testing.assert_allclose(got.target_value, exact, rtol=3e-7, atol=0.0)


def test_softcapped_one_class_rows_have_zero_loss(gpu_path):
    """One class: the loss is exactly 0 (log of a sum of exps that is at least 1), never an ulp
    below, with and without the gradient."""
    logits = np.linspace(-30.0, 30.0, 64).astype(np.float32).reshape(64, 1)
    labels = np.zeros(64, np.int64)
    device_logits, device_labels = cupy.asarray(logits), cupy.asarray(labels)
    for softcap in (None, 5.0):
        loss = host(fastxent.sparse_cross_entropy(device_logits, device_labels, reduction="none", softcap=softcap))
        assert (loss == 0.0).all(), loss[loss != 0.0]
        loss, grad = fastxent.sparse_cross_entropy_with_grad(
            device_logits, device_labels, reduction="none", softcap=softcap
        )
        assert (host(loss) == 0.0).all() and (host(grad) == 0.0).all()


def test_bad_arguments_raise():
    logits = cupy.zeros((4, 5), dtype=cupy.float32)
    with pytest.raises(TypeError, match="labels must be integers"):
        fastxent.sparse_cross_entropy(logits, cupy.zeros(4, dtype=cupy.float32))
    with pytest.raises(ValueError, match="labels shape"):
        fastxent.sparse_cross_entropy(logits, cupy.zeros(3, dtype=cupy.int64))
    with pytest.raises(TypeError, match="logits must be"):
        fastxent.sparse_cross_entropy(cupy.zeros((4, 5), dtype=cupy.int32), cupy.zeros(4, dtype=cupy.int64))
    with pytest.raises(ValueError, match="class_weight"):
        fastxent.sparse_cross_entropy(logits, cupy.zeros(4, dtype=cupy.int64), class_weight=cupy.ones(4))


def test_int32_labels(rng):
    logits = random_logits(rng, (6, 300), np.float32)
    labels = random_labels(rng, (6,), 300)
    got = fastxent.sparse_cross_entropy(cupy.asarray(logits), cupy.asarray(labels.astype(np.int32)), reduction="none")
    assert_loss_matches(got, reference.sparse_cross_entropy(logits, labels, reduction="none"), np.float32)


@pytest.mark.skipif(not EMULATED, reason="counts the host emulator's device-to-host reads")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", (True, False), ids=("logits", "probabilities"))
def test_one_synchronisation_per_call(rng, reduction, from_logits):
    """A valid call reads the device once (the label check, with the class-weight sum, the
    "mean" denominator and the softmax hint packed into the same read); probabilities add the
    negative-value check after the launch."""
    num_classes = 300
    values = (
        random_logits(rng, (2, 3, num_classes), np.float32)
        if from_logits
        else random_probabilities(rng, (2, 3, num_classes), np.float32)
    )
    labels = random_labels(rng, (2, 3), num_classes)
    labels[0, 0] = -100
    options = dict(
        reduction=reduction,
        from_logits=from_logits,
        ignore_index=-100,
        class_weight=cupy.asarray(random_class_weight(rng, num_classes)),
        sample_weight=cupy.asarray(random_sample_weight(rng, (2, 3))),
        label_smoothing=0.1,
    )
    device_values, device_labels = cupy.asarray(values), cupy.asarray(labels)
    before = cupy.host_reads()
    loss, grad = fastxent.sparse_cross_entropy_with_grad(device_values, device_labels, **options)
    assert cupy.host_reads() - before == (1 if from_logits else 2)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
        values,
        labels,
        **dict(options, class_weight=host(options["class_weight"]), sample_weight=host(options["sample_weight"])),
    )
    assert_loss_matches(loss, ref_loss, np.float32)
    assert_grad_matches(grad, ref_grad, np.float32)


# ----------------------------------------------------------------------------------------
# Arrays handed to the kernels: strided views, devices, threads and grid limits
# ----------------------------------------------------------------------------------------


def strided(host_array):
    """A device view of ``host_array`` with stride 2 (every other element of a larger buffer)."""
    base = cupy.zeros((2 * host_array.shape[0],) + host_array.shape[1:], dtype=host_array.dtype)
    base[::2] = cupy.asarray(host_array)
    view = base[::2]
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("option", ("class_weight", "smoothing_and_class_weight", "probabilities"))
def test_strided_class_weight(rng, gpu_path, option):
    """A class_weight view with stride 2 gives the loss and gradient of its values (a kernel
    indexing its base pointer would read every other weight of the buffer instead)."""
    num_rows, num_classes = 4, 2500
    from_logits = option != "probabilities"
    inputs, labels, options = make_case(
        rng,
        "class_weight" if option == "probabilities" else option,
        (num_rows,),
        num_classes,
        np.float32,
        from_logits=from_logits,
    )
    weights = options.pop("class_weight")
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
        inputs, labels, from_logits=from_logits, reduction="sum", class_weight=weights, **options
    )
    loss, grad = fastxent.sparse_cross_entropy_with_grad(
        cupy.asarray(inputs),
        cupy.asarray(labels),
        from_logits=from_logits,
        reduction="sum",
        class_weight=strided(weights),
        **options,
    )
    assert_loss_matches(loss, ref_loss, np.float32)
    assert_grad_matches(grad, ref_grad, np.float32, natural_gradient_size(labels, "sum", class_weight=weights))
    if from_logits:
        assert_path(gpu_path, num_rows, num_classes)


@pytest.mark.parametrize("smoothing", (0.0, 0.1))
def test_launcher_takes_strided_arrays(rng, gpu_path, smoothing):
    """The launcher makes every array it hands a kernel C-contiguous: class weights in the
    options, labels and sample weights (the API passes contiguous ones; other callers may not)."""
    num_rows, num_classes = 5, 3001
    logits = random_logits(rng, (num_rows, num_classes), np.float32)
    labels = random_labels(rng, (num_rows,), num_classes)
    sample_weight = random_sample_weight(rng, (num_rows,))
    weights = random_class_weight(rng, num_classes)
    settings = dict(label_smoothing=smoothing, class_weight=weights)
    cpu_loss, cpu_grad, _ = cpu_xent.fused_xent(
        logits.copy(), labels, sample_weight, kernel_options(num_classes, **settings), want_grad=True
    )
    options = kernel_options(num_classes, **settings, xp=cupy)
    options = KernelOptions(**{**options.__dict__, "class_weight": strided(weights)})
    loss, grad, _ = gpu_xent.fused_xent(
        cupy.asarray(logits), strided(labels), strided(sample_weight), options, want_grad=True
    )
    np.testing.assert_allclose(host(loss), cpu_loss, rtol=4e-5, atol=2e-5)
    np.testing.assert_allclose(host(grad), cpu_grad, rtol=4e-5, atol=2e-6 * float(np.abs(cpu_grad).max()))


def test_class_range_takes_strided_class_weight(rng):
    from fastxent.cpu import partial as cpu_partial
    from fastxent.gpu import partial as gpu_partial

    rows, local, options = range_case(rng, np.float32, "smoothing_and_class_weight")
    ref = cpu_partial.range_stats(rows, local, options)
    device_options = KernelOptions(**{**options.__dict__, "class_weight": strided(options.class_weight)})
    got = gpu_partial.range_stats(cupy.asarray(rows), local, device_options)
    np.testing.assert_allclose(
        got.weighted_sum, ref.weighted_sum, rtol=1e-5, atol=1e-5 * np.abs(ref.weighted_sum).max()
    )


def split_rows_case(rng, monkeypatch, num_rows=6, num_classes=1500):
    """Rows forced onto the split path (parts of 256 classes), with an ignored row."""
    force_gpu_path(monkeypatch, "split")
    logits = random_logits(rng, (num_rows, num_classes), np.float32)
    labels = random_labels(rng, (num_rows,), num_classes)
    labels[1] = -100
    return logits, labels


def test_split_rows_in_chunks_of_the_grid_limit(rng, monkeypatch):
    """More rows than gridDim.y allows go in several launches (the limit lowered to 3 here: on
    the host emulator the device's own limit too, so an unchunked launch is rejected)."""
    logits, labels = split_rows_case(rng, monkeypatch, num_rows=8)
    monkeypatch.setattr(gpu_xent, "MAX_GRID_ROWS", 3, raising=False)
    if EMULATED:
        import emulated_kernels

        monkeypatch.setattr(emulated_kernels, "MAX_GRID_Y", 3)
    recorder = PathRecorder(monkeypatch)
    check_gpu(logits, labels, reduction="none", ignore_index=-100, label_smoothing=0.1)
    assert recorder.used("part_stats") and recorder.used("part_grad")


def test_split_row_counters_per_thread(rng, monkeypatch):
    """Under CuPy's per-thread default stream every thread's current stream has the same handle
    (cudaStreamPerThread) though the streams differ: two threads must not share the split
    path's arrival counters, or their launches overlap on them."""
    import threading

    per_thread_stream = types.SimpleNamespace(ptr=2)  # cudaStreamPerThread
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: per_thread_stream)
    logits, labels = split_rows_case(rng, monkeypatch)
    ref_loss = reference.sparse_cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    counters = {}
    launch = gpu_xent.launch_part_stats

    def recording_launch(*args, **kwargs):
        counters.setdefault(threading.get_ident(), set()).add(args[11].data.ptr)
        return launch(*args, **kwargs)

    monkeypatch.setattr(gpu_xent, "launch_part_stats", recording_launch)
    device_logits, device_labels = cupy.asarray(logits), cupy.asarray(labels)
    start = threading.Barrier(2)

    def work():
        start.wait()
        results = []
        for _ in range(3):
            loss = fastxent.sparse_cross_entropy(device_logits, device_labels, reduction="none", ignore_index=-100)
            results.append(host(loss))
        return results

    outcomes = [None, None]

    def run(index):
        try:
            outcomes[index] = work()
        except BaseException as error:  # reported below
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        for loss in outcome:
            assert_loss_matches(loss, ref_loss, np.float32)
    assert len(counters) == 2
    first, second = counters.values()
    assert not first & second, "two threads launched on the same counter buffer"


def test_arrays_on_another_device(rng):
    """Arrays on device 1 while device 0 is current: kernels, limits and counters of device 1
    (every path), and results on device 1."""
    if _device_count() < 2:
        pytest.skip("one CUDA device")
    cases = {"rows": (3, 2500), "split": (1, 40000)}
    for name, shape in cases.items():
        logits = random_logits(rng, shape, np.float32)
        labels = random_labels(rng, shape[:1], shape[1])
        weights = random_class_weight(rng, shape[1])
        ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(
            logits, labels, class_weight=weights, label_smoothing=0.1
        )
        with cupy.cuda.Device(1):
            device_logits, device_labels = cupy.asarray(logits), cupy.asarray(labels)
            device_weights = cupy.asarray(weights)
        assert cupy.cuda.runtime.getDevice() == 0
        loss, grad = fastxent.sparse_cross_entropy_with_grad(
            device_logits, device_labels, class_weight=device_weights, label_smoothing=0.1
        )
        assert cupy.cuda.runtime.getDevice() == 0
        assert loss.device.id == 1 and grad.device.id == 1, name
        assert_loss_matches(loss, ref_loss, np.float32)
        assert_grad_matches(grad, ref_grad, np.float32, natural_gradient_size(labels, class_weight=weights))
    probs = random_probabilities(rng, (3, 500), np.float32)
    labels = random_labels(rng, (3,), 500)
    with cupy.cuda.Device(1):
        device_probs, device_labels = cupy.asarray(probs), cupy.asarray(labels)
    loss = fastxent.sparse_cross_entropy(device_probs, device_labels, from_logits=False)
    assert_loss_matches(loss, reference.sparse_cross_entropy(probs, labels, from_logits=False), np.float32)


def test_class_range_on_another_device(rng):
    if _device_count() < 2:
        pytest.skip("one CUDA device")
    from fastxent import _range
    from fastxent.cpu import partial as cpu_partial
    from fastxent.gpu import partial as gpu_partial

    rows, local, options = range_case(rng, np.float32, "plain")
    ref = cpu_partial.range_stats(rows, local, options)
    with cupy.cuda.Device(1):
        device_rows = cupy.asarray(rows)
    got = gpu_partial.range_stats(device_rows, local, options)
    np.testing.assert_allclose(got.sum_exp, ref.sum_exp, rtol=1e-5)
    target_weight = _range.target_weights(local, options.class_weight)
    coefs = _range.finish_rows(ref, local, target_weight, np.ones(len(local)), options)
    ref_grad = cpu_partial.range_grad(rows, local, ref, coefs, target_weight, options)
    grad = gpu_partial.range_grad(device_rows, local, ref, coefs, target_weight, options)
    assert grad.device.id == 1
    assert_grad_close(host(grad), ref_grad.astype(np.float64), np.float32)


# ----------------------------------------------------------------------------------------
# Streams and 64-bit offsets (real GPUs only)
# ----------------------------------------------------------------------------------------


@pytest.mark.skipif(EMULATED, reason="the host emulator has no streams")
def test_runs_on_the_current_stream(rng):
    logits = random_logits(rng, (64, 4096), np.float32)
    labels = random_labels(rng, (64,), 4096)
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(logits, labels)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        device_logits = cupy.asarray(logits)
        loss, grad = fastxent.sparse_cross_entropy_with_grad(device_logits, cupy.asarray(labels))
        loss_host = cupy.asnumpy(loss, stream=stream)
        grad_host = cupy.asnumpy(grad, stream=stream)
    stream.synchronize()
    assert_loss_matches(loss_host, ref_loss, np.float32)
    assert_grad_matches(grad_host, ref_grad, np.float32)


LIMIT_PROBE = """
import numpy, cupy
from fastxent.gpu import xent
from fastxent._options import KernelOptions

xent.SPLIT_MIN_CLASSES = 2**62  # one block per row: the row's whole range in one sweep
num_classes = xent.MAX_CLASSES
logits = cupy.zeros((1, num_classes), dtype=cupy.float16)
options = KernelOptions(
    from_logits=True, label_smoothing=0.0, z_loss=0.0, softcap=None, class_weight=None,
    class_weight_total=float(num_classes), num_classes=num_classes, grad_scale=1.0,
)
labels, weights = cupy.asarray([num_classes - 1]), cupy.ones(1)
loss, _, _ = xent.fused_xent(logits, labels, weights, options, want_grad=False)
print("loss", repr(float(loss[0])))
"""


@pytest.mark.slow
def test_class_count_at_the_limit():
    """C = MAX_CLASSES = 2^31 - 1 (float16, one row of zeros: loss ln C). The scalar tail's
    index (tail + thread, stepping by the block) passes INT_MAX there: in 32 bits it wraps
    negative and reads before the row. On the host emulator in a child process (a wrapped
    index may crash it; the zero row costs no memory until written), about a minute."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The child imports the same CuPy (the emulator's stand-in sits first on the path).
    paths = ([os.path.dirname(os.path.dirname(cupy.__file__))] if EMULATED else []) + [root]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", LIMIT_PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    loss = float(result.stdout.split("loss")[-1])
    np.testing.assert_allclose(loss, np.log(2.0**31 - 1), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(EMULATED, reason="too large for the host emulator")
def test_more_than_2_31_elements():
    """N * C > 2^31: offsets past the 32-bit range (float16, 4 GiB), forward and in place."""
    num_classes = 131072
    num_rows = 2**31 // num_classes + 2
    try:
        logits = cupy.zeros((num_rows, num_classes), dtype=cupy.float16)
    except cupy.cuda.memory.OutOfMemoryError:
        pytest.skip("not enough GPU memory for 4 GiB of logits")
    rng = np.random.default_rng(3)
    tail = rng.standard_normal((2, num_classes)).astype(np.float16)
    logits[-2:] = cupy.asarray(tail)
    labels = cupy.zeros(num_rows, dtype=cupy.int64)
    labels[-1] = num_classes - 1
    per_row = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    ref_loss, ref_grad = reference.sparse_cross_entropy_with_grad(tail, host(labels[-2:]), reduction="none")
    assert_loss_matches(per_row[-2:], ref_loss, np.float16)
    np.testing.assert_allclose(host(per_row[:3]), np.log(num_classes), rtol=1e-6)
    _, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="sum", inplace=True)
    assert grad is logits
    assert_grad_matches(logits[-2:], ref_grad, np.float16)


# ----------------------------------------------------------------------------------------
# Class ranges (vocabulary-parallel shards): the GPU statistics and gradient of one range
# against the CPU's, and a sharded loss over GPU ranks against the core
# ----------------------------------------------------------------------------------------

RANGE_OPTIONS = {
    "plain": {},
    "smoothing_and_class_weight": {"label_smoothing": 0.2, "class_weight": True},
    "softcap": {"softcap": 4.0, "label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
}


def device_rows(rows):
    """(CuPy rows, storage) for a NumPy array: bfloat16 as uint16 bits where CuPy lacks it."""
    if rows.dtype == BFLOAT16 and not CUPY_BFLOAT16:
        return cupy.asarray(rows.view(np.uint16)), "bfloat16"
    return cupy.asarray(rows), None


def from_device_rows(array, dtype):
    values = host(array)
    return values.view(dtype) if values.dtype != dtype else values


def range_case(rng, dtype, option, num_rows=7, num_classes=1500, lo=400, hi=1300):
    """Rows of classes [lo, hi) of longer rows; targets inside, elsewhere (both sides), ignored."""
    from fastxent import _range

    logits = random_logits(rng, (num_rows, num_classes), dtype)
    labels = rng.integers(lo, hi, num_rows)
    labels[1], labels[2], labels[3] = lo - 5, hi + 7, -1
    weights = rng.uniform(0.5, 2.0, num_classes) if RANGE_OPTIONS[option].get("class_weight") else None
    spec = {k: v for k, v in RANGE_OPTIONS[option].items() if k != "class_weight"}
    options = KernelOptions(
        from_logits=True,
        label_smoothing=spec.get("label_smoothing", 0.0),
        z_loss=spec.get("z_loss", 0.0),
        softcap=spec.get("softcap"),
        class_weight=None if weights is None else weights[lo:hi],
        class_weight_total=float(num_classes if weights is None else weights.sum()),
        num_classes=num_classes,
        grad_scale=0.25,
    )
    rows = np.ascontiguousarray(logits[:, lo:hi])
    local = _range.local_labels(labels, lo, hi - lo)
    assert set(local[:4]) >= {_range.ELSEWHERE, _range.IGNORED}
    return rows, local, options


def value_rtol_for(options, dtype) -> float:
    """Softcapped values may differ by an ulp of the compute type between the backends' tanh;
    without a softcap they are the inputs themselves."""
    if options.softcap is None:
        return 0.0
    return 1e-15 if dtype == np.float64 else 5e-7


@pytest.mark.parametrize("layout", ("one_part", "parts", "row_chunks"))
@pytest.mark.parametrize("option", tuple(RANGE_OPTIONS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_class_range_matches_cpu(rng, monkeypatch, dtype, option, layout):
    from fastxent import _range
    from fastxent.cpu import partial as cpu_partial
    from fastxent.gpu import partial as gpu_partial

    if layout == "parts":  # parts of 256 classes: four per row of this range
        monkeypatch.setattr(gpu_xent, "SPLIT_PART_ALIGN", 256)
        monkeypatch.setattr(gpu_xent, "SPLIT_BLOCKS_PER_SM", 2**20)
    if layout == "row_chunks":  # launches of at most 3 rows
        monkeypatch.setattr(gpu_partial, "MAX_GRID_ROWS", 3)
    rows, local, options = range_case(rng, dtype, option)
    dev_rows, storage = device_rows(rows)
    kernel = gpu_partial.CupyKernel(storage)

    ref = cpu_partial.range_stats(rows, local, options)
    got = kernel.stats(dev_rows, local, options)
    # float32 sums of ~1000 terms in another order: a few units of 1e-7, bounded well below 1e-5.
    stats_rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got.row_max, ref.row_max, rtol=value_rtol_for(options, dtype), atol=0.0)
    np.testing.assert_allclose(got.sum_exp, ref.sum_exp, rtol=stats_rtol)
    np.testing.assert_allclose(
        got.weighted_sum, ref.weighted_sum, rtol=stats_rtol, atol=stats_rtol * np.abs(ref.weighted_sum).max(initial=1.0)
    )
    np.testing.assert_allclose(got.target_value, ref.target_value, rtol=value_rtol_for(options, dtype), atol=0.0)
    np.testing.assert_array_equal(got.target_input, ref.target_input)
    assert got.row_max[3] == -np.inf and got.sum_exp[3] == 0.0  # the ignored row: the identity

    # Gradient from the same coefficients (as if this range were merged with the others).
    target_weight = _range.target_weights(local, options.class_weight)
    coefs = _range.finish_rows(ref, local, target_weight, np.ones(len(local)), options)
    ref_grad = cpu_partial.range_grad(rows, local, ref, coefs, target_weight, options)
    for inplace in (False, True):
        source = dev_rows.copy()
        grad = kernel.grad(source, local, ref, coefs, target_weight, options, inplace=inplace)
        assert (grad is source) == inplace
        assert_grad_close(from_device_rows(grad, dtype), ref_grad.astype(np.float64), dtype)
    np.testing.assert_array_equal(from_device_rows(dev_rows, dtype), rows)  # input untouched


def test_class_range_rejects_probabilities(rng):
    from fastxent.gpu import partial as gpu_partial

    rows, local, options = range_case(rng, np.float32, "plain")
    from dataclasses import replace

    with pytest.raises(NotImplementedError, match="probabilities"):
        gpu_partial.range_stats(cupy.asarray(rows), local, replace(options, from_logits=False))


def serialise_gpu_ranks(monkeypatch):
    """One thread rank at a time in the class-range launchers (the host emulator runs one
    launch at once; on a GPU the ranks would be processes)."""
    import threading

    from fastxent.gpu import partial as gpu_partial

    lock = threading.Lock()
    for name in ("range_stats", "range_grad"):
        original = getattr(gpu_partial, name)

        def locked(*args, _original=original, **kwargs):
            with lock:
                return _original(*args, **kwargs)

        monkeypatch.setattr(gpu_partial, name, locked)


def put_edge_values(logits, labels):
    """-inf classes, a target at -inf, a row of -inf in rank 0's shard only, +inf, NaN, 1e30,
    and a row of -inf everywhere (rows 0-6 of at least 7, 1000 classes split 600/400)."""
    labels[1] = 10
    logits[0, ::3] = -np.inf
    logits[1, 10] = -np.inf
    logits[2, :600] = -np.inf
    logits[3, 700] = np.inf
    logits[4, 5] = np.nan
    logits[5] *= 1e30
    logits[6, :] = -np.inf


@pytest.mark.parametrize("option", ("plain", "everything", "edges", "edges_smoothing"))
def test_sharded_loss_on_gpu_ranks(rng, monkeypatch, option):
    """Two ranks (threads) whose rows are CuPy arrays, through fastxent.distributed's two
    collectives, against the core on the whole rows."""
    from sharding import bounds, make_case, run_ranks, shard_kwargs

    from fastxent.distributed import _sharded
    from fastxent.gpu import partial as gpu_partial

    serialise_gpu_ranks(monkeypatch)

    case = {"edges": "plain", "edges_smoothing": "smoothing+class_weight"}.get(option, option)
    logits, labels, kwargs = make_case(rng, case, 9, 1000)
    if option.startswith("edges"):
        put_edge_values(logits, labels)
    reduction = "none" if option.startswith("edges") else "sum"
    ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction=reduction, **kwargs)
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local_kwargs = shard_kwargs(kwargs, lo, hi)
        settings = _sharded.check_settings(
            True,
            reduction,
            local_kwargs.get("ignore_index"),
            local_kwargs.get("label_smoothing", 0.0),
            local_kwargs.get("z_loss", 0.0),
            local_kwargs.get("softcap"),
            lo,
        )
        rows = cupy.asarray(np.ascontiguousarray(logits[:, lo:hi]))
        shard = _sharded.Shard(rows, lo, hi - lo, np.float32, local_kwargs.get("class_weight"))
        forward = _sharded.sharded_forward(
            comm, gpu_partial.CupyKernel(), shard, labels, settings, local_kwargs.get("sample_weight")
        )
        return forward.loss, host(forward.grad())

    results = run_ranks(2, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(np.isnan(results[0][0]), np.isnan(ref_loss))
    np.testing.assert_allclose(results[0][0], ref_loss, rtol=1e-6, atol=0.0, equal_nan=True)
    grad = np.concatenate([g for _, g in results], axis=1)
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(ref_grad))
    finite = np.isfinite(ref_grad).all(axis=1)
    assert_grad_close(grad[finite], ref_grad[finite], np.float32)


@pytest.mark.parametrize("dtype", ("float32", "bfloat16", "float64"))
def test_torch_tensors_through_the_cuda_kernel(rng, dtype):
    """fastxent.distributed's CudaKernel: DLPack views of tensors (bfloat16 as its bits), the
    gradient into a new tensor or in place. CUDA tensors on a GPU; CPU tensors on the host
    emulator, whose CuPy stand-in takes DLPack from any tensor."""
    torch = pytest.importorskip("torch")
    from fastxent import _range
    from fastxent import _torch_interop as interop
    from fastxent.cpu import partial as cpu_partial
    from fastxent.distributed import _torch

    device = "cpu" if EMULATED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    rows, local, options = range_case(rng, np.float32, "smoothing_and_class_weight")
    tensor = torch.from_numpy(rows).to(getattr(torch, dtype)).to(device)
    rows = interop.to_numpy(tensor.cpu())  # the values as stored
    ref = cpu_partial.range_stats(rows, local, options)
    kernel = _torch.CudaKernel()
    got = kernel.stats(tensor, local, options)
    np.testing.assert_array_equal(got.row_max, ref.row_max)
    np.testing.assert_allclose(got.sum_exp, ref.sum_exp, rtol=1e-12 if dtype == "float64" else 1e-5)
    np.testing.assert_array_equal(got.target_input, ref.target_input)

    target_weight = _range.target_weights(local, options.class_weight)
    coefs = _range.finish_rows(ref, local, target_weight, np.ones(len(local)), options)
    ref_grad = cpu_partial.range_grad(rows, local, ref, coefs, target_weight, options).astype(np.float64)
    grad = kernel.grad(tensor, local, ref, coefs, target_weight, options, inplace=False)
    assert grad.dtype == tensor.dtype and grad.device == tensor.device and grad.data_ptr() != tensor.data_ptr()
    assert_grad_close(interop.to_numpy(grad.cpu()), ref_grad, rows.dtype)
    same = kernel.grad(tensor, local, ref, coefs, target_weight, options, inplace=True)
    assert same is tensor
    assert_grad_close(interop.to_numpy(tensor.cpu()), ref_grad, rows.dtype)


@pytest.mark.parametrize("mode", ("new", "inplace", "class_axis_first"))
def test_distributed_api_takes_cupy_arrays(rng, monkeypatch, mode):
    """fastxent.distributed with CuPy logits: CUDA kernels, CuPy results, the core's values."""
    from sharding import bounds, make_case, run_ranks, shard_kwargs

    from fastxent import distributed

    serialise_gpu_ranks(monkeypatch)
    logits, labels, kwargs = make_case(rng, "everything", 6, 1000)
    axis = 0 if mode == "class_axis_first" else -1
    ref_loss, ref_grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="mean", **kwargs)
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        local = np.ascontiguousarray(logits[:, lo:hi])
        if axis == 0:
            local = np.ascontiguousarray(local.T)
        device_local = cupy.asarray(local)
        local_kwargs = to_device_options(shard_kwargs(kwargs, lo, hi))
        loss, grad = distributed.sparse_cross_entropy_with_grad(
            device_local,
            cupy.asarray(labels),
            vocab_start=lo,
            group=comm,
            axis=axis,
            inplace=mode == "inplace",
            **local_kwargs,
        )
        assert isinstance(loss, cupy.ndarray) and isinstance(grad, cupy.ndarray)
        assert (grad is device_local) == (mode == "inplace")
        grad = host(grad)
        return host(loss), grad.T if axis == 0 else grad

    results = run_ranks(2, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    np.testing.assert_allclose(results[0][0], ref_loss, rtol=1e-6)
    assert_grad_close(np.concatenate([g for _, g in results], axis=1), ref_grad, np.float32)


def test_distributed_api_rejects_cupy_probabilities_on_every_rank(rng, monkeypatch):
    from sharding import bounds, run_ranks

    from fastxent import distributed

    serialise_gpu_ranks(monkeypatch)
    probs = random_probabilities(rng, (4, 1000), np.float32)
    labels = random_labels(rng, (4,), 1000)
    starts = bounds((600, 400))

    def work(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        return distributed.sparse_cross_entropy(
            cupy.asarray(probs[:, lo:hi]), labels, vocab_start=lo, group=comm, from_logits=False
        )

    for result in run_ranks(2, work):
        assert isinstance(result, ValueError)
        assert "CuPy" in str(result) or "rejected its arguments" in str(result)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_unless_one(rng, dtype):
    """``xent_scale_*``: a factor of 1 leaves the gradient's bits alone (the kernel reads the
    factor on the device: no host read); any other factor gives the bits of the product in the
    compute type rounded once to the storage (PyTorch's multiply), NaN included; an empty
    gradient launches nothing. bfloat16 as its uint16 bits."""
    storage = "bfloat16" if dtype == BFLOAT16 else np.dtype(dtype).name
    compute = np.float64 if dtype == np.float64 else np.float32
    values = (rng.standard_normal(3001) * 3).astype(dtype)
    values[:3] = [np.inf, -0.0, np.nan]

    def on_device(array):
        return cupy.asarray(array.view(np.uint16)) if dtype == BFLOAT16 else cupy.asarray(array)

    def on_host(array):
        return cupy.asnumpy(array).view(BFLOAT16) if dtype == BFLOAT16 else cupy.asnumpy(array)

    for factor in (1.0, 2.5, -0.3, 0.0, np.nan):
        grad = on_device(values.copy())
        reads = cupy.host_reads() if EMULATED else None
        gpu_xent.scale_unless_one(grad, on_device(np.array([factor], dtype=dtype)), storage)
        if EMULATED:
            assert cupy.host_reads() == reads
        rounded_factor = np.array([factor], dtype=dtype).astype(compute)[0]
        expected = values if factor == 1.0 else (values.astype(compute) * rounded_factor).astype(dtype)
        got = on_host(grad).astype(np.float64)
        expected = expected.astype(np.float64)
        np.testing.assert_array_equal(got, expected)  # NaN where NaN is expected
        numbers = ~np.isnan(expected)
        np.testing.assert_array_equal(np.signbit(got[numbers]), np.signbit(expected[numbers]))  # -0.0 too
    gpu_xent.scale_unless_one(on_device(values[:0].copy()), on_device(np.array([2.0], dtype=dtype)), storage)
