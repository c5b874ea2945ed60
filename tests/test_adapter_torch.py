"""fastxent.torch against torch.nn.functional.cross_entropy: loss and gradient over random inputs
and every option, PyTorch's quirks (NaN for a "mean" over nothing), errors, zero-copy exchange
and a training run that must follow PyTorch's own step for step."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent.torch as fxt  # noqa: E402
from conftest import assert_at_least_naive_accuracy, assert_grad_close, assert_loss_close  # noqa: E402
from fastxent import reference  # noqa: E402

pytestmark = pytest.mark.peers

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# Leading shapes around the class axis: unbatched (C,), a batch (N, C), PyTorch's (N, C, d1, d2).
SHAPES = {"unbatched": ((), ()), "batch": ((7,), ()), "spatial": ((2,), (3, 4))}
NUM_CLASSES = 9
# float32 and float64 must match PyTorch to their own rounding.
TORCH_TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def numpy_dtype(dtype):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else np.dtype(str(dtype).split(".")[1])


def as64(tensor):
    return tensor.detach().double().numpy()


def random_case(rng, shape_name, dtype, target_kind, with_options):
    batch, spatial = SHAPES[shape_name]
    shape = batch + (NUM_CLASSES,) + spatial
    logits = torch.from_numpy(rng.standard_normal(shape) * 3).to(dtype).requires_grad_()
    target_shape = batch + spatial
    options = {}
    if target_kind == "indices":
        target = torch.from_numpy(rng.integers(0, NUM_CLASSES, size=target_shape))
        if with_options and target.numel() > 1:
            flat = target.view(-1)
            flat[torch.from_numpy(rng.permutation(flat.numel())[: max(1, flat.numel() // 4)])] = -100
    else:
        raw = torch.from_numpy(rng.random(shape))
        # Rows summing to 1 or not: PyTorch's gradient is the exact derivative either way.
        row_total = torch.from_numpy(rng.choice([1.0, 0.7, 1.6], batch + (1,) + spatial))
        target = (raw / raw.sum(dim=len(batch), keepdim=True) * row_total).to(dtype)
    if with_options:
        options = {"weight": torch.from_numpy(rng.uniform(0.25, 2.0, NUM_CLASSES)).to(dtype),
                   "label_smoothing": float(rng.uniform(0.05, 0.3))}
    return logits, target, options


def reference_of(logits, target, reduction, options):
    """fastxent.reference with PyTorch's conventions spelled out (class axis, "mean" divisors)."""
    axis = 0 if logits.dim() == 1 else 1
    weight = options.get("weight")
    class_weight = None if weight is None else as64(weight)
    eps = options.get("label_smoothing", 0.0)
    if target.is_floating_point():
        core_reduction = "sum_over_batch_size" if reduction == "mean" else reduction
        return reference.categorical_cross_entropy_with_grad(
            as64(logits), as64(target), reduction=core_reduction, label_smoothing=eps,
            class_weight=class_weight, axis=axis)
    return reference.sparse_cross_entropy_with_grad(
        as64(logits), target.numpy(), reduction=reduction, ignore_index=-100, label_smoothing=eps,
        class_weight=class_weight, axis=axis)


def loss_and_grad(function, logits, target, reduction, options, upstream):
    loss = function(logits, target, reduction=reduction, **options)
    (grad,) = torch.autograd.grad(loss, logits, grad_outputs=upstream)
    return loss, grad


@pytest.mark.parametrize("dtype_name", list(TORCH_DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("target_kind", ("indices", "probabilities"))
@pytest.mark.parametrize("with_options", (False, True), ids=("plain", "weight+smoothing+ignore"))
def test_matches_pytorch(rng, dtype_name, shape_name, target_kind, with_options):
    dtype = TORCH_DTYPES[dtype_name]
    logits, target, options = random_case(rng, shape_name, dtype, target_kind, with_options)
    for reduction in ("mean", "sum", "none"):
        shape = target.shape if target_kind == "indices" else logits.shape[:1] + logits.shape[2:]
        if logits.dim() == 1:
            shape = ()
        # Powers of two: scaling by them is exact, so the half-precision checks see only the kernel.
        upstream = torch.from_numpy(rng.choice([0.5, 1.0, 2.0, 4.0], shape if reduction == "none" else ())).to(dtype)
        ours, our_grad = loss_and_grad(fxt.cross_entropy, logits, target, reduction, options, upstream)
        theirs, their_grad = loss_and_grad(F.cross_entropy, logits, target, reduction, options, upstream)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert our_grad.dtype == their_grad.dtype and our_grad.shape == logits.shape
        ref_loss, ref_grad = reference_of(logits, target, reduction, options)
        class_axis = 0 if logits.dim() == 1 else 1
        ref_grad = ref_grad * (np.expand_dims(as64(upstream), class_axis) if reduction == "none" else as64(upstream))
        if dtype in TORCH_TOLERANCE:
            tol = TORCH_TOLERANCE[dtype]
            np.testing.assert_allclose(as64(ours), as64(theirs), **tol)
            np.testing.assert_allclose(as64(our_grad), as64(their_grad), rtol=tol["rtol"],
                                       atol=tol["atol"] * max(1.0, float(np.abs(as64(their_grad)).max())))
            assert_loss_close(as64(ours), ref_loss, numpy_dtype(dtype), scale=4.0)
            assert_grad_close(as64(our_grad), ref_grad, numpy_dtype(dtype), scale=2.0)
        else:
            # PyTorch rounds intermediates to the half type; fastxent rounds once. Both are held to
            # the float64 reference, and fastxent must be at least as accurate as PyTorch.
            np_dtype = numpy_dtype(dtype)
            assert_at_least_naive_accuracy(as64(ours), ref_loss, as64(theirs), np_dtype, "loss")
            assert_at_least_naive_accuracy(as64(our_grad), ref_grad, as64(their_grad), np_dtype, "grad", scale=2.0)


def test_mean_over_nothing_is_nan_like_pytorch(rng):
    logits = torch.randn(4, 5, 3, requires_grad=True)
    ignored = torch.full((4, 3), -100)
    for function in (fxt.cross_entropy, F.cross_entropy):
        loss = function(logits, ignored)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isnan(loss) and not grad.any()
    # Counted rows whose class weights are all 0: NaN loss and NaN gradient on those rows only.
    target = torch.tensor([0, 1, -100, 0])
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    flat = torch.randn(4, 5, requires_grad=True)
    results = []
    for function in (fxt.cross_entropy, F.cross_entropy):
        loss = function(flat, target, weight=weight, label_smoothing=0.1)
        results.append((loss, torch.autograd.grad(loss, flat)[0]))
    (ours, our_grad), (theirs, their_grad) = results
    assert torch.isnan(ours) and torch.isnan(theirs)
    assert torch.equal(torch.isnan(our_grad), torch.isnan(their_grad))
    assert not our_grad[2].any() and torch.isnan(our_grad[[0, 1, 3]]).all()
    # An empty batch: NaN for "mean" with either kind of target, 0 for "sum".
    empty = torch.zeros(0, 5, requires_grad=True)
    assert torch.isnan(fxt.cross_entropy(empty, torch.zeros(0, dtype=torch.long)))
    assert torch.isnan(fxt.cross_entropy(empty, torch.zeros(0, 5)))
    assert fxt.cross_entropy(empty, torch.zeros(0, dtype=torch.long), reduction="sum").item() == 0.0


def test_module_is_a_drop_in(rng):
    weight = torch.rand(6) + 0.5
    ours = fxt.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.05)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    logits = torch.randn(8, 6, requires_grad=True)
    target = torch.randint(0, 6, (8,))
    target[0] = 2
    loss, their_loss = ours(logits, target), theirs(logits, target)
    torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(their_loss, logits)[0],
                               rtol=1e-5, atol=1e-6)
    # The deprecated size_average / reduce pair overrides reduction, as in PyTorch.
    with pytest.warns(UserWarning, match="size_average and reduce"):
        summed = fxt.cross_entropy(logits, target, size_average=False)
    with pytest.warns(UserWarning, match="size_average and reduce"):
        their_sum = F.cross_entropy(logits, target, size_average=False)
    torch.testing.assert_close(summed, their_sum, rtol=1e-5, atol=1e-5)


def test_errors():
    logits = torch.randn(3, 4)
    with pytest.raises(IndexError, match=r"label 4 at position \(1,\) is outside the valid range \[0, 4\)"):
        fxt.cross_entropy(logits, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError):  # the same error is fastxent's ValueError too
        fxt.cross_entropy(logits, torch.tensor([0, -1, 1]))
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        fxt.cross_entropy(logits, torch.rand(3, 4), ignore_index=0)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        fxt.cross_entropy(logits, torch.tensor([0, 1, 1]), reduction="avg")


def test_gradient_is_kept_from_forward_and_scaled(rng):
    logits = torch.randn(5, 7, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    loss = fxt.cross_entropy(logits, target)
    kept = loss.grad_fn.grad
    assert kept is not None and kept.shape == logits.shape
    (grad,) = torch.autograd.grad(loss * 3.0, logits)
    torch.testing.assert_close(grad, 3.0 * kept)
    # No gradient wanted: the forward computes the loss alone.
    with torch.no_grad():
        loss_only = fxt.cross_entropy(logits, target)
    assert loss_only.grad_fn is None
    torch.testing.assert_close(loss_only, loss.detach())
    # Second derivatives are not provided: PyTorch is told so instead of getting zeros.
    loss = fxt.cross_entropy(logits, target)
    (first,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), logits)


def test_exchange_is_zero_copy():
    for dtype in TORCH_DTYPES.values():
        tensor = torch.randn(4, 6).to(dtype)
        array = fxt._to_array(tensor)
        assert array.ctypes.data == tensor.data_ptr() and array.shape == (4, 6)
        back = fxt._to_tensor(array)
        assert back.data_ptr() == tensor.data_ptr() and back.dtype == dtype
    # A non-contiguous view is shared as a view too.
    wide = torch.randn(6, 4)
    assert fxt._to_array(wide.t()).ctypes.data == wide.data_ptr()


def train(loss_function, steps=25, seed=0):
    """A small classifier (32 features -> 10 -> 4 classes) trained with Adam on fixed random data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(64, 32, generator=generator)
    labels = torch.randint(0, 4, (64,), generator=generator)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_function(model(features), labels)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return np.array(history), [p.detach().clone() for p in model.parameters()]


def test_training_follows_pytorch_step_for_step():
    ours, our_params = train(fxt.CrossEntropyLoss())
    theirs, their_params = train(torch.nn.CrossEntropyLoss())
    # float32 rounding differences only: 1e-5 relative per step after 25 Adam steps.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert theirs[-1] < 0.8 * theirs[0]  # it did train
    for mine, other in zip(our_params, their_params):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-5)
