"""Shared test grids, tolerances and input generators: the one place tests take them from.

Shapes and dtypes are chosen for a reason (see the comments on each grid), tolerances are set
per dtype from how the kernels compute (see ``TOLERANCES``), and every test draws fresh random
inputs from a per-test RNG whose base seed changes per session (printed in the report header,
fixed with ``FASTXENT_TEST_SEED=<int>`` to reproduce a failure).
"""

from __future__ import annotations

import importlib
import os
import zlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

import fastxent
from fastxent.cpu import _kernels
from fastxent.cpu import xent as cpu_xent

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# ----------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------

BLOCK = _kernels.BLOCK  # the kernels read a row in blocks of this many classes

# Class counts, each for a reason.
CLASS_COUNTS = (
    1,  # a single class: the loss is 0 and the gradient 0 whatever the logit
    7,  # shorter than the 16 max-lanes: only the scalar tail loop runs
    1000,  # a typical small head, not a multiple of the lanes (1000 = 62 * 16 + 8)
    BLOCK - 1,  # one block minus one: full lanes and a tail, in a single block
    BLOCK,  # exactly one block
    BLOCK + 1,  # one block plus a one-element second block (the running max is rescaled)
)
# A realistic vocabulary; kept to small N so the suite stays fast.
LARGE_CLASS_COUNT = 32000
LARGE_CLASS_LEAD_SHAPES = ((), (2,))

# Leading (non-class) shapes of rank 0, 1 and 2: a single row, a batch, a batch of sequences.
LEAD_SHAPES = ((), (5,), (3, 4))

# Split-row inputs that are cut into at least two parts (see ``split_part_count``): few rows
# (N <= 3 gives at least two parts per row for any thread count) and more than one block.
SPLIT_CASES = (
    ((), BLOCK + 1),  # one row, a full block and a one-element part
    ((3,), 2 * BLOCK + 904),  # three rows of three blocks, the last one partial
)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16)
LOW_PRECISION_DTYPES = (np.dtype(np.float16), BFLOAT16)
REDUCTIONS = fastxent.REDUCTIONS

KERNEL_PATHS = ("rows", "split")


def dtype_id(dtype) -> str:
    return np.dtype(dtype).name


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


# ----------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Loss: |got - ref| <= loss_atol + loss_rtol * |ref|.

    Gradient: |got - ref| <= grad_atol_abs + grad_atol * max|ref| + grad_rtol * |ref|.

    Half-precision logits are decoded exactly and the loss is computed in float32, so their loss
    tolerance is float32's. Their gradient is computed in float32 and rounded once to the
    storage type: ``half_ulp`` is that rounding (relative), ``grad_rtol`` one whole unit in the
    last place. ``grad_atol_abs`` is where relative precision ends: float16's subnormal step
    (values below 6e-5 lose it), or the compute type's smallest normal number.
    """

    loss_rtol: float
    loss_atol: float
    grad_rtol: float
    grad_atol: float
    grad_atol_abs: float
    half_ulp: float


TOLERANCES = {
    # float64 logits are computed in float64 throughout.
    np.dtype(np.float64): Tolerance(
        loss_rtol=1e-11,
        loss_atol=1e-11,
        grad_rtol=1e-10,
        grad_atol=1e-13,
        grad_atol_abs=float(np.finfo(np.float64).tiny),
        half_ulp=2.0**-53,
    ),
    # float32 compute: block sums of 2048 terms in 16 float32 lanes, a 2-ulp exp.
    np.dtype(np.float32): Tolerance(
        loss_rtol=1e-5,
        loss_atol=2e-5,
        grad_rtol=2e-5,
        grad_atol=1e-6,
        grad_atol_abs=float(np.finfo(np.float32).tiny),
        half_ulp=2.0**-24,
    ),
    np.dtype(np.float16): Tolerance(
        loss_rtol=1e-5, loss_atol=2e-5, grad_rtol=2.0**-10, grad_atol=1e-6, grad_atol_abs=2.0**-24, half_ulp=2.0**-11
    ),
    BFLOAT16: Tolerance(
        loss_rtol=1e-5,
        loss_atol=2e-5,
        grad_rtol=2.0**-7,
        grad_atol=1e-6,
        grad_atol_abs=float(np.finfo(np.float32).tiny),
        half_ulp=2.0**-8,
    ),
}
# Float32 compute error on top of the final rounding (the gradient's relative error in float32).
COMPUTE_SLACK = 1e-5


def tolerance(dtype) -> Tolerance:
    return TOLERANCES[np.dtype(dtype)]


def loss_dtype_for(dtype) -> np.dtype:
    """The documented loss dtype: float64 for float64 logits, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _as64(array) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def representable(ref, dtype) -> np.ndarray:
    """``ref`` (float64) with the values that overflow ``dtype`` replaced by the infinity that
    rounding to ``dtype`` gives: a float16 gradient of -1e6 can only be stored as -inf."""
    ref64 = _as64(ref)
    with np.errstate(over="ignore"):
        rounded = ref64.astype(dtype).astype(np.float64)
    return np.where(np.isinf(rounded) & np.isfinite(ref64), rounded, ref64)


def assert_loss_close(got, ref, dtype, *, scale=1.0):
    """Loss within the dtype's tolerance; NaN and +-inf must match position for position.

    ``scale`` widens the tolerance for losses whose terms are larger than the total.
    """
    tol = tolerance(dtype)
    got64, ref64 = _as64(got), _as64(ref)
    assert got64.shape == ref64.shape, (got64.shape, ref64.shape)
    np.testing.assert_allclose(got64, ref64, rtol=tol.loss_rtol * scale, atol=tol.loss_atol * scale, equal_nan=True)


def gradient_scale(
    labels, *, reduction="mean", ignore_index=None, class_weight=None, sample_weight=None, **_other_options
) -> float:
    """The natural size of a gradient entry: the largest row weight times the reduction's factor.

    Absolute gradient tolerances are taken relative to this, so an all-zero reference gradient
    (one class, every row ignored) still gets the float32 compute error as its tolerance.
    """
    lead_shape = np.shape(labels)
    labels = np.asarray(labels).reshape(-1)
    valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    weight = np.ones(labels.shape)
    if class_weight is not None:
        weight = weight * np.asarray(class_weight, np.float64)[np.where(valid, labels, 0)]
    if sample_weight is not None:
        weight = weight * np.broadcast_to(np.asarray(sample_weight, np.float64), lead_shape).reshape(-1)
    weight = np.where(valid, weight, 0.0)
    if reduction == "mean":
        denominator = weight.sum()
    elif reduction == "sum_over_batch_size":
        denominator = np.count_nonzero(valid)
    else:
        denominator = 1.0
    return float(weight.max(initial=0.0) / denominator) if denominator else 0.0


def grad_atol(ref, dtype, scale=0.0) -> float:
    tol = tolerance(dtype)
    ref64 = _as64(ref)
    magnitude = max(float(np.max(np.abs(ref64[np.isfinite(ref64)]), initial=0.0)), scale)
    return tol.grad_atol_abs + tol.grad_atol * magnitude


# Comparing with another library's float32 result adds that library's own error: PyTorch's
# float32 gradient differs from float64 by up to 3e-5 (relative) for (N, C, d) inputs with
# label smoothing, where fastxent's stays under 1e-6.
PEER_GRAD_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def assert_grad_close(got, ref, dtype, *, scale=0.0, rtol=None):
    """Gradient within one unit in the last place of the storage dtype (the ceiling).

    ``scale``: the gradient's natural size (``gradient_scale``) when it may exceed max|ref|.
    ``rtol``: a wider relative tolerance where ``ref`` is not float64 (``PEER_GRAD_RTOL``).
    """
    tol = tolerance(dtype)
    got64, ref64 = _as64(got), representable(ref, dtype)
    assert got64.shape == ref64.shape, (got64.shape, ref64.shape)
    np.testing.assert_allclose(
        got64, ref64, rtol=tol.grad_rtol if rtol is None else rtol, atol=grad_atol(ref, dtype, scale), equal_nan=True
    )


def assert_at_least_naive_accuracy(got, ref, naive, dtype, kind, *, scale=0.0):
    """|got - ref64| <= |naive - ref64| + tol elementwise: the fused kernel is at least as
    accurate as the unfused computation done in the same dtype.

    kind "loss": tol is the loss tolerance; kind "grad": half a unit in the last place of the
    dtype (one correct rounding) plus float32 compute error.
    """
    tol = tolerance(dtype)
    ref64 = representable(ref, dtype) if kind == "grad" else _as64(ref)
    got64, naive64 = _as64(got), _as64(naive)
    assert got64.shape == ref64.shape == naive64.shape, (got64.shape, ref64.shape, naive64.shape)
    finite = np.isfinite(ref64)
    assert np.array_equal(np.isfinite(got64), finite), "non-finite values where the reference has none"
    with np.errstate(invalid="ignore"):
        fused_error = np.abs(got64 - ref64)[finite]
        naive_error = np.abs(naive64 - ref64)[finite]
    naive_error = np.where(np.isnan(naive_error), np.inf, naive_error)
    magnitude = np.abs(ref64[finite])
    if kind == "loss":
        slack = tol.loss_atol + tol.loss_rtol * magnitude
    else:
        slack = grad_atol(ref, dtype, scale) + (tol.half_ulp + COMPUTE_SLACK) * magnitude
    worse = fused_error > naive_error + slack
    assert not worse.any(), (
        f"{int(worse.sum())} {kind} value(s) less accurate than the naive {np.dtype(dtype).name} computation: "
        f"fused error {fused_error[worse][:5]}, naive error {naive_error[worse][:5]}, reference {ref64[finite][worse][:5]}"
    )


# ----------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------

_SESSION_SEED = int(os.environ.get("FASTXENT_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
# pytest-xdist workers inherit the environment of the process that starts them: every worker of
# a run then draws from the seed the report header prints.
os.environ.setdefault("FASTXENT_TEST_SEED", str(_SESSION_SEED))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Start the selected long subprocess checks now (``start_in_background`` of their module,
    e.g. test_cuda_compile.py): each runs on one core beside the rest of the suite."""
    for item in items:
        start = getattr(getattr(item, "module", None), "start_in_background", None)
        if start is not None:
            start(item.name)


def pytest_report_header(config):
    return f"fastxent test seed: FASTXENT_TEST_SEED={_SESSION_SEED}"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test: the session seed mixed with the test's id."""
    return np.random.default_rng([_SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


def random_logits(rng, shape, dtype, *, scale=3.0) -> np.ndarray:
    """Normal logits of the given scale in ``dtype``, with no exact zeros after rounding."""
    values = (rng.standard_normal(shape) * scale).astype(dtype)
    # A zero logit would hide a missing term (0 * anything): move it off zero.
    values[values == 0] = np.asarray(scale / 7, dtype=dtype)
    return values


def random_labels(rng, lead_shape, num_classes) -> np.ndarray:
    return rng.integers(0, num_classes, size=lead_shape, dtype=np.int64)


def random_probabilities(rng, shape, dtype, *, axis=-1, zero_fraction=0.1) -> np.ndarray:
    """Softmax outputs in ``dtype`` with about ``zero_fraction`` of the entries exactly zero.

    Rows are renormalised after the zeros are placed, so they sum to 1 up to rounding.
    """
    logits = rng.standard_normal(shape) * 3.0
    probs = np.exp(logits - logits.max(axis=axis, keepdims=True))
    probs[rng.random(shape) < zero_fraction] = 0.0
    total = probs.sum(axis=axis, keepdims=True)
    probs = probs / np.where(total > 0, total, 1.0)
    return probs.astype(dtype)


def random_class_weight(rng, num_classes) -> np.ndarray:
    return rng.uniform(0.25, 2.0, size=num_classes)


def random_sample_weight(rng, lead_shape) -> np.ndarray:
    return rng.uniform(0.0, 2.0, size=lead_shape)


def ignored_labels(rng, labels, ignore_index, fraction=0.3) -> np.ndarray:
    """A copy of ``labels`` with about ``fraction`` of them set to ``ignore_index`` (at least one
    when there are at least two labels, and never all of them)."""
    labels = np.array(labels, copy=True)
    flat = labels.reshape(-1)
    if flat.size >= 2:
        chosen = rng.random(flat.size) < fraction
        chosen[rng.integers(flat.size)] = True
        chosen[0] = False if chosen.all() else chosen[0]
        flat[chosen] = ignore_index
    return labels


# ----------------------------------------------------------------------------------------
# Kernel paths
# ----------------------------------------------------------------------------------------


def force_kernel_path(monkeypatch, path: str) -> None:
    """Route every logits call to one kernel path, whatever N and C are.

    "rows": one task per row on the thread pool (the split threshold made unreachable, small
    inputs too: they would otherwise run on the calling thread). "split": every row cut
    into parts of whole blocks (inputs longer than one block get several parts).
    """
    if path == "rows":
        monkeypatch.setattr(cpu_xent, "SPLIT_MIN_CLASSES", 2**62)
        monkeypatch.setattr(cpu_xent, "SERIAL_WORK", -1)  # the row-parallel kernel, however small
    elif path == "split":
        monkeypatch.setattr(cpu_xent, "SPLIT_MIN_CLASSES", 0)
        monkeypatch.setattr(cpu_xent, "SPLIT_ROWS_PER_THREAD", 2**40)
    else:
        raise ValueError(f"unknown kernel path {path!r}")


def split_part_count(num_rows: int, num_classes: int) -> int:
    """How many parts the split-row path cuts each row into for this input."""
    return len(cpu_xent.part_bounds_for(num_rows, num_classes)) - 1


def assert_path_taken(path: str, num_rows: int, num_classes: int) -> None:
    """The launcher's own decision agrees with the forced path (guards the monkeypatch)."""
    if num_rows:
        assert cpu_xent.use_split_rows(num_rows, num_classes) == (path == "split")


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request, monkeypatch) -> str:
    """Runs the test once on the row-parallel path and once on the split-row path."""
    force_kernel_path(monkeypatch, request.param)
    return request.param


@pytest.fixture
def split_rows(monkeypatch) -> None:
    """Forces the split-row path for this test."""
    force_kernel_path(monkeypatch, "split")


# Named option sets shared by the CPU and GPU parity suites.
OPTION_NAMES = (
    "plain",
    "ignore_index",
    "ignore_valid_class",
    "label_smoothing",
    "class_weight",
    "sample_weight",
    "z_loss",
    "softcap",
    "smoothing_and_class_weight",
    "everything",
)


def make_case(rng, option, lead_shape, num_classes, dtype, *, from_logits=True):
    """(logits or probabilities, labels, options) for one named option set."""
    shape = lead_shape + (num_classes,)
    inputs = random_logits(rng, shape, dtype) if from_logits else random_probabilities(rng, shape, dtype)
    labels = random_labels(rng, lead_shape, num_classes)
    options = {}
    if option in ("ignore_index", "everything"):
        options["ignore_index"] = -100
    if option == "ignore_valid_class":
        options["ignore_index"] = 2  # a real class index may be the ignored one
    if "ignore_index" in options:
        labels = ignored_labels(rng, labels, options["ignore_index"])
    if option in ("label_smoothing", "smoothing_and_class_weight", "everything"):
        options["label_smoothing"] = 0.1
    if option in ("class_weight", "smoothing_and_class_weight", "everything"):
        options["class_weight"] = random_class_weight(rng, num_classes)
    if option in ("sample_weight", "everything"):
        options["sample_weight"] = random_sample_weight(rng, lead_shape)
    if option in ("z_loss", "everything"):
        options["z_loss"] = 1e-3
    if option in ("softcap", "everything") and from_logits:
        options["softcap"] = 5.0
    return inputs, labels, options


# ----------------------------------------------------------------------------------------
# GPU test modules
# ----------------------------------------------------------------------------------------


def cuda_device_count(cupy) -> int:
    """How many CUDA devices CuPy sees: 0 without a driver or with a broken install."""
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError without a driver, or a broken install
        return 0


def cupy_with_a_device():
    """CuPy for a GPU test module, or a skip of the whole module where CuPy is missing or sees no
    device. ``FASTXENT_REQUIRE_GPU=1`` (set by tools/gpu_check.sh on a GPU machine) makes either
    an error instead, where a skip would hide a broken install."""
    required = os.environ.get("FASTXENT_REQUIRE_GPU") == "1"
    cupy = importlib.import_module("cupy") if required else pytest.importorskip("cupy")
    if cuda_device_count(cupy) == 0:
        if required:
            raise RuntimeError("FASTXENT_REQUIRE_GPU=1 but CuPy sees no CUDA device")
        pytest.skip("CuPy sees no CUDA device", allow_module_level=True)
    return cupy
