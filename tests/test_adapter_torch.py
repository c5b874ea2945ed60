"""PyTorch, in one file: fastxent.torch against torch.nn.functional.cross_entropy (loss and
gradient over random inputs and every option, PyTorch's quirks such as NaN for a "mean" over
nothing, errors, zero-copy exchange, a training run that must follow PyTorch's own step for
step, OpInfo and ModuleInfo), and fastxent's core API on NumPy arrays against
torch.nn.functional.cross_entropy on every CPU kernel path (the last section)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from conftest import (  # noqa: E402
    BLOCK,
    PEER_GRAD_RTOL,
    assert_at_least_naive_accuracy,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    gradient_scale,
    ignored_labels,
    random_class_weight,
    random_labels,
    random_logits,
)

import fastxent  # noqa: E402
import fastxent.torch as fxt  # noqa: E402
from fastxent import reference  # noqa: E402

pytestmark = pytest.mark.peers

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
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
        options = {
            "weight": torch.from_numpy(rng.uniform(0.25, 2.0, NUM_CLASSES)).to(dtype),
            "label_smoothing": float(rng.uniform(0.05, 0.3)),
        }
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
            as64(logits),
            as64(target),
            reduction=core_reduction,
            label_smoothing=eps,
            class_weight=class_weight,
            axis=axis,
        )
    return reference.sparse_cross_entropy_with_grad(
        as64(logits),
        target.numpy(),
        reduction=reduction,
        ignore_index=-100,
        label_smoothing=eps,
        class_weight=class_weight,
        axis=axis,
    )


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
            np.testing.assert_allclose(
                as64(our_grad),
                as64(their_grad),
                rtol=tol["rtol"],
                atol=tol["atol"] * max(1.0, float(np.abs(as64(their_grad)).max())),
            )
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
    torch.testing.assert_close(
        torch.autograd.grad(loss, logits)[0], torch.autograd.grad(their_loss, logits)[0], rtol=1e-5, atol=1e-6
    )
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
    kept = loss.grad_fn.saved_tensors[3]
    assert kept.shape == logits.shape
    (grad,) = torch.autograd.grad(loss * 3.0, logits)
    torch.testing.assert_close(grad, 3.0 * kept)
    # loss.backward(): the kept gradient becomes .grad itself, without a copy.
    loss = fxt.cross_entropy(logits, target)
    kept_pointer = loss.grad_fn.saved_tensors[3].data_ptr()
    loss.backward()
    assert logits.grad.data_ptr() == kept_pointer
    # No gradient wanted: the forward computes the loss alone and records no graph.
    with torch.no_grad():
        loss_only = fxt.cross_entropy(logits, target)
    assert loss_only.grad_fn is None
    torch.testing.assert_close(loss_only, loss.detach())
    assert fxt.cross_entropy(logits.detach(), target).grad_fn is None


def test_forward_only_when_no_gradient_can_be_asked(monkeypatch):
    calls = []
    from fastxent import _torch_ops

    original = _torch_ops.sparse_cross_entropy_with_grad
    monkeypatch.setattr(
        _torch_ops, "sparse_cross_entropy_with_grad", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    logits = torch.randn(5, 7, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    with torch.no_grad():
        fxt.cross_entropy(logits, target)
    fxt.cross_entropy(logits.detach(), target)
    assert calls == []
    fxt.cross_entropy(logits, target)
    assert calls == [1]


def test_an_in_place_change_before_backward_raises():
    logits = torch.randn(5, 7, requires_grad=True)
    scaled = logits * 1.0
    loss = fxt.cross_entropy(scaled, torch.randint(0, 7, (5,)))
    (first,) = torch.autograd.grad(loss, scaled, retain_graph=True)
    first.mul_(2.0)  # the caller's gradient is the kept one: changing it must not go unnoticed
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, scaled)


def test_exchange_is_zero_copy():
    from fastxent import _torch_interop as interop

    for dtype in TORCH_DTYPES.values():
        tensor = torch.randn(4, 6).to(dtype)
        array = interop.to_array(tensor)
        assert array.ctypes.data == tensor.data_ptr() and array.shape == (4, 6)
        back = interop.to_tensor(array)
        assert back.data_ptr() == tensor.data_ptr() and back.dtype == dtype
    # A non-contiguous view is shared as a view too.
    wide = torch.randn(6, 4)
    assert interop.to_array(wide.t()).ctypes.data == wide.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
def test_bfloat16_cuda_tensors_are_accepted_by_both_torch_paths(rng):
    """bfloat16 CUDA tensors are accepted by fastxent.torch and by fastxent.distributed's CUDA
    kernel alike (fastxent._torch_interop): zero-copy where CuPy has bfloat16, else through a
    float32 copy (fastxent.torch) or the tensor's bits (the class-range kernels). Both give the
    values of the same bfloat16 logits on the CPU."""
    pytest.importorskip("cupy")
    from fastxent import _torch_interop as interop
    from fastxent._options import KernelOptions
    from fastxent.distributed import _torch

    cpu = torch.from_numpy(rng.standard_normal((6, 300)).astype(np.float32)).to(torch.bfloat16)
    target = torch.from_numpy(rng.integers(0, 300, 6))
    logits = cpu.cuda().requires_grad_()
    loss = fxt.cross_entropy(logits, target.cuda())
    loss.backward()
    ref = cpu.clone().requires_grad_()
    ref_loss = fxt.cross_entropy(ref, target)
    ref_loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert_grad_close(as64(logits.grad.cpu()), as64(ref.grad), numpy_dtype(torch.bfloat16))

    options = KernelOptions(True, 0.0, 0.0, None, None, 300.0, 300, 1.0)
    labels = target.numpy()
    got = _torch.CudaKernel().stats(cpu.cuda(), labels, options)
    expected = _torch.NumpyKernel().stats(interop.to_numpy(cpu), labels, options)
    np.testing.assert_array_equal(got.row_max, expected.row_max)
    np.testing.assert_allclose(got.sum_exp, expected.sum_exp, rtol=1e-5)


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
    for mine, other in zip(our_params, their_params, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------
# PyTorch's own test inputs: the OpInfo of nn.functional.cross_entropy and the ModuleInfo of
# nn.CrossEntropyLoss, run through fastxent.torch
# ----------------------------------------------------------------------------------------

# torch.testing._internal needs the expecttest package (in the test extra).


def _opinfo():
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy" and o.variant_test_name == ""]
    return op


def _moduleinfo():
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss]
    return info


def _opinfo_samples(dtype):
    torch.manual_seed(1234)
    return list(_opinfo().sample_inputs("cpu", dtype, requires_grad=True))


def _sample_id(sample):
    target = sample.args[0]
    kind = "probs" if target.is_floating_point() else "index"
    options = ",".join(f"{k}" if k == "weight" else f"{k}={v}" for k, v in sample.kwargs.items())
    return f"{tuple(sample.input.shape)}-{kind}-{options or 'default'}"


def _differentiable(sample):
    """The sample's tensors that require grad (the input; a probability target too)."""
    return [t for t in (sample.input, sample.args[0]) if t.requires_grad]


def _call(function, sample):
    def loss_of(*tensors):
        input, target = (tensors[0], tensors[1]) if len(tensors) == 2 else (tensors[0], sample.args[0])
        return function(input, target, **sample.kwargs)

    return loss_of


OPINFO_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16, torch.bfloat16), ids=str)
def test_opinfo_values_and_gradients(dtype):
    """Every OpInfo sample: the loss and the gradient of every input that requires grad, against
    PyTorch in the same dtype (float32, float64) or at least as accurate as PyTorch against float64
    (float16, bfloat16)."""
    assert dtype in _opinfo().dtypes
    samples = _opinfo_samples(dtype)
    assert len(samples) >= 20
    for sample in samples:
        tensors = _differentiable(sample)
        ours = _call(fxt.cross_entropy, sample)(*tensors)
        theirs = _call(F.cross_entropy, sample)(*tensors)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, _sample_id(sample)
        upstream = torch.rand_like(theirs) + 0.5
        our_grads = torch.autograd.grad(ours, tensors, upstream)
        their_grads = torch.autograd.grad(theirs, tensors, upstream)
        if dtype in OPINFO_TOLERANCE:
            torch.testing.assert_close(ours, theirs, **OPINFO_TOLERANCE[dtype], msg=_sample_id(sample))
            for mine, other in zip(our_grads, their_grads, strict=True):
                torch.testing.assert_close(mine, other, **OPINFO_TOLERANCE[dtype], msg=_sample_id(sample))
            continue
        wide = [t.detach().double().requires_grad_() for t in tensors]
        exact = _call(F.cross_entropy, sample_in_float64(sample))(*wide)
        exact_grads = torch.autograd.grad(exact, wide, upstream.double())
        for mine, other, ref in zip((ours, *our_grads), (theirs, *their_grads), (exact, *exact_grads), strict=True):
            our_error = (mine.double() - ref).abs().max().item()
            their_error = (other.double() - ref).abs().max().item()
            scale = max(1.0, ref.abs().max().item())
            assert our_error <= their_error + 2 * torch.finfo(dtype).eps * scale, _sample_id(sample)


def sample_in_float64(sample):
    """The sample with its floating keyword tensors (the class weights) in float64."""
    kwargs = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in sample.kwargs.items()
    }
    return type(sample)(sample.input, *sample.args, **kwargs)


@pytest.mark.parametrize("index", range(21))
def test_opinfo_gradcheck(index):
    """gradcheck and gradgradcheck in float64 with every mode PyTorch's OpInfo declares for
    cross_entropy: reverse, batched reverse, forward AD, batched forward AD, second derivatives
    (reverse over reverse, forward over reverse) and batched second derivatives."""
    op = _opinfo()
    assert op.supports_forward_ad and op.supports_fwgrad_bwgrad
    samples = _opinfo_samples(torch.float64)
    assert len(samples) == 21
    sample = samples[index]
    function = _call(fxt.cross_entropy, sample)
    inputs = tuple(_differentiable(sample))
    assert torch.autograd.gradcheck(
        function,
        inputs,
        check_batched_grad=True,
        check_forward_ad=True,
        check_batched_forward_grad=True,
        check_undefined_grad=True,
    )
    assert torch.autograd.gradgradcheck(
        function, inputs, check_batched_grad=True, check_fwd_over_rev=True, check_rev_over_rev=True
    )


def test_opinfo_torch_func_transforms():
    """vmap, grad, vmap of grad (per-sample gradients), jvp, jacrev, jacfwd and hessian agree with
    PyTorch's own loss on every float64 OpInfo sample."""
    from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

    for sample in _opinfo_samples(torch.float64):
        x = sample.input.detach()
        target = sample.args[0].detach()

        def ours(x, t, kwargs=sample.kwargs):
            return fxt.cross_entropy(x, t, **kwargs)

        def theirs(x, t, kwargs=sample.kwargs):
            return F.cross_entropy(x, t, **kwargs)

        for transform in (jacrev, jacfwd, hessian):
            torch.testing.assert_close(
                transform(ours)(x, target),
                transform(theirs)(x, target),
                msg=f"{transform.__name__} {_sample_id(sample)}",
            )
        tangent = torch.randn_like(x)
        torch.testing.assert_close(
            jvp(functools.partial(ours, t=target), (x,), (tangent,)),
            jvp(functools.partial(theirs, t=target), (x,), (tangent,)),
        )
        # Per-sample losses and gradients: map over a new leading batch of 3 inputs and targets.
        xs = torch.randn((3,) + x.shape, dtype=x.dtype)
        targets = torch.stack([target[torch.randperm(target.shape[0])] if target.dim() else target for _ in range(3)])
        torch.testing.assert_close(vmap(ours)(xs, targets), vmap(theirs)(xs, targets))
        if sample.kwargs.get("reduction", "mean") != "none":
            torch.testing.assert_close(vmap(grad(ours))(xs, targets), vmap(grad(theirs))(xs, targets))


def test_double_backward_reaches_the_weights_exactly():
    """A gradient penalty through the loss: the second-order term reaches the model's weights."""
    torch.manual_seed(0)
    inputs = torch.randn(6, 5)
    target = torch.randint(0, 7, (6,))
    grads = []
    for function in (fxt.cross_entropy, F.cross_entropy):
        torch.manual_seed(1)
        layer = torch.nn.Linear(5, 7)
        logits = layer(inputs)
        loss = function(logits, target, label_smoothing=0.1)
        (penalty,) = torch.autograd.grad(loss, logits, create_graph=True)
        (loss + 10 * penalty.pow(2).sum()).backward()
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_forward_mode_ad_with_dual_tensors():
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 6, dtype=torch.float64)
    tangent = torch.randn_like(x)
    probabilities = torch.rand(4, 6, dtype=torch.float64)
    target_tangent = torch.randn_like(probabilities)
    for target, t_tangent in ((torch.tensor([1, 0, 5, 2]), None), (probabilities, target_tangent)):
        results = []
        for function in (fxt.cross_entropy, F.cross_entropy):
            with fwAD.dual_level():
                dual_target = target if t_tangent is None else fwAD.make_dual(target, t_tangent)
                loss = function(fwAD.make_dual(x, tangent), dual_target, reduction="none", label_smoothing=0.2)
                results.append(fwAD.unpack_dual(loss).tangent)
        torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.float16), ids=str)
def test_moduleinfo_forward_and_backward(dtype):
    """Every ModuleInfo input of nn.CrossEntropyLoss: fastxent's module against PyTorch's
    reference function (values) and PyTorch's module (values and input gradients)."""
    info = _moduleinfo()
    assert dtype in info.dtypes
    torch.manual_seed(4321)
    module_inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
    assert len(module_inputs) >= 50
    tolerance = dict(rtol=1e-3, atol=3e-2) if dtype == torch.float16 else OPINFO_TOLERANCE[dtype]
    for module_input in module_inputs:
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        ours, theirs = fxt.CrossEntropyLoss(*args, **kwargs), torch.nn.CrossEntropyLoss(*args, **kwargs)
        forward_args = module_input.forward_input.args
        tensors = [t for t in forward_args if t.requires_grad]
        our_loss, their_loss = ours(*forward_args), theirs(*forward_args)
        desc = module_input.desc
        torch.testing.assert_close(our_loss, their_loss, **tolerance, msg=desc)
        if module_input.reference_fn is not None:
            expected = module_input.reference_fn(ours, *[t.detach() for t in forward_args])  # adds the parameters
            torch.testing.assert_close(our_loss, expected.to(our_loss.dtype), **tolerance, msg=desc)
        upstream = torch.ones_like(their_loss)
        for mine, other in zip(
            torch.autograd.grad(our_loss, tensors, upstream),
            torch.autograd.grad(their_loss, tensors, upstream),
            strict=True,
        ):
            torch.testing.assert_close(mine, other, **tolerance, msg=desc)


def test_moduleinfo_gradcheck():
    info = _moduleinfo()
    torch.manual_seed(99)
    module_inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=True)
    for module_input in module_inputs:
        module = fxt.CrossEntropyLoss(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
        forward_args = module_input.forward_input.args
        tensors = tuple(t for t in forward_args if t.requires_grad)

        def function(*differentiable, forward_args=forward_args, module=module):
            replaced = iter(differentiable)
            return module(*[next(replaced) if t.requires_grad else t for t in forward_args])

        if sum(t.numel() for t in tensors) > 60:
            continue  # the larger inputs repeat the same cases; numerical Jacobians grow as size squared
        assert torch.autograd.gradcheck(function, tensors, check_batched_grad=True, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(function, tensors, check_fwd_over_rev=True)


def test_moduleinfo_error_inputs_raise_pytorchs_types():
    """ModuleInfo's error inputs raise the exception type PyTorch raises (the wording is ours:
    it names the offending shape, dtype or value)."""
    info = _moduleinfo()
    error_inputs = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=True, training=True
    )
    assert len(error_inputs) >= 6
    for error_input in error_inputs:
        module_input = error_input.module_error_input
        with pytest.raises(error_input.error_type):
            module = fxt.CrossEntropyLoss(*module_input.constructor_input.args, **module_input.constructor_input.kwargs)
            module(*module_input.forward_input.args)


def test_error_types_are_fastxents_and_pytorchs():
    logits = torch.randn(3, 4)
    cases = [
        (lambda: fxt.cross_entropy(logits, torch.zeros(3, 4, dtype=torch.long)), "floating point type"),
        (lambda: fxt.cross_entropy(logits, torch.zeros(3)), "Long"),
        (lambda: fxt.cross_entropy(logits, torch.zeros(2, dtype=torch.long)), "shape"),
        (lambda: fxt.cross_entropy(logits, torch.zeros(3, dtype=torch.long), weight=torch.ones(5)), "5"),
        (lambda: fxt.cross_entropy(logits, torch.zeros(3, dtype=torch.long), label_smoothing=1.5), "1.5"),
        (lambda: fxt.cross_entropy(logits.view(3, 4, 1), torch.zeros(3, 2, dtype=torch.long)), "shape"),
    ]
    for call, words in cases:
        with pytest.raises(fxt.InvalidInputError, match=words) as caught:
            call()
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)
    # A class weight that requires grad: PyTorch's loss is not differentiable in it either.
    with pytest.raises(RuntimeError, match="weight"):
        fxt.cross_entropy(logits, torch.zeros(3, dtype=torch.long), weight=torch.ones(4, requires_grad=True))


def test_label_smoothing_one_is_allowed_as_in_pytorch():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2, 1])
    for reduction in ("mean", "sum", "none"):
        ours = fxt.cross_entropy(logits, target, label_smoothing=1.0, reduction=reduction)
        theirs = F.cross_entropy(logits, target, label_smoothing=1.0, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(
            torch.autograd.grad(ours.sum(), logits)[0], torch.autograd.grad(theirs.sum(), logits)[0]
        )


def test_transform_compositions_and_target_only_gradients():
    from torch.func import grad, vmap

    xs = torch.randn(3, 4, 5, dtype=torch.float64)
    ys = torch.randint(0, 5, (3, 4))

    def mapped_total(function, reduction="mean"):
        return lambda x: vmap(lambda a, b: function(a, b, reduction=reduction))(x, ys).sum()

    torch.testing.assert_close(grad(mapped_total(fxt.cross_entropy))(xs), grad(mapped_total(F.cross_entropy))(xs))
    # Ordinary autograd over a vmap of the fused loss.
    results = []
    for function in (fxt.cross_entropy, F.cross_entropy):
        leaf = xs.clone().requires_grad_()
        mapped_total(function, "sum")(leaf).backward()
        results.append(leaf.grad)
    torch.testing.assert_close(results[0], results[1])
    # A probability target that requires grad, logits that do not.
    target = torch.rand(4, 5, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad(fxt.cross_entropy(logits, target, label_smoothing=0.1), target)[0],
        torch.autograd.grad(F.cross_entropy(logits, target, label_smoothing=0.1), target)[0],
    )


# ----------------------------------------------------------------------------------------
# fastxent's core API (NumPy arrays) against torch.nn.functional.cross_entropy, loss and
# autograd gradient, float32 and float64, on every CPU kernel path. One deliberate difference:
# a "mean" over rows that are all ignored is NaN in PyTorch (0 / 0) and 0.0 in fastxent (the
# gradient is zero in both) (``test_fully_ignored_mean_is_the_one_difference``).
# ----------------------------------------------------------------------------------------

CORE_IGNORE_INDEX = -100  # PyTorch's default ignore_index
CORE_REDUCTIONS = ("none", "sum", "mean")
CORE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# (logits shape, class axis): PyTorch puts the classes on axis 1 of (N, C, d1, ...).
CORE_SHAPES = (((6, 2 * BLOCK + 904), 1), ((2, 1000, 3), 1), ((4, 7), 1))

CORE_OPTIONS = ("plain", "ignore_index", "label_smoothing", "weight", "everything")


def torch_core_loss_and_grad(logits, labels, **options):
    """F.cross_entropy and the autograd gradient of its sum (of the rows for "none")."""
    weight = options.pop("weight", None)
    inputs = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        inputs, torch.tensor(labels), weight=None if weight is None else torch.tensor(weight), **options
    )
    loss.sum().backward()
    return loss.detach().numpy(), inputs.grad.numpy()


def core_options(rng, option, num_classes):
    options = {}
    if option in ("ignore_index", "everything"):
        options["ignore_index"] = CORE_IGNORE_INDEX
    if option in ("label_smoothing", "everything"):
        options["label_smoothing"] = 0.15
    if option in ("weight", "everything"):
        options["weight"] = random_class_weight(rng, num_classes)
    return options


@pytest.mark.parametrize("reduction", CORE_REDUCTIONS)
@pytest.mark.parametrize("option", CORE_OPTIONS)
@pytest.mark.parametrize("shape,axis", CORE_SHAPES, ids=lambda case: str(case))
@pytest.mark.parametrize("dtype", CORE_DTYPES, ids=dtype_id)
def test_torch_cross_entropy(rng, kernel_path, dtype, shape, axis, option, reduction):
    num_classes = shape[axis]
    lead_shape = tuple(np.delete(np.array(shape), axis))
    logits = random_logits(rng, shape, dtype)
    labels = random_labels(rng, lead_shape, num_classes)
    torch_options = core_options(rng, option, num_classes)
    if "weight" in torch_options:  # PyTorch wants the weights in the logits' dtype
        torch_options["weight"] = torch_options["weight"].astype(dtype)
    if "ignore_index" in torch_options:
        labels = ignored_labels(rng, labels, CORE_IGNORE_INDEX)
    expected, expected_grad = torch_core_loss_and_grad(logits, labels, reduction=reduction, **torch_options)

    options = dict(torch_options, axis=axis, reduction=reduction)
    options["class_weight"] = options.pop("weight", None)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, **options)
    assert loss.dtype == expected.dtype == dtype
    assert loss.shape == expected.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_loss_close(loss, expected, dtype)
    assert_loss_close(fastxent.sparse_cross_entropy(logits, labels, **options), expected, dtype)
    assert_grad_close(grad, expected_grad, dtype, scale=gradient_scale(labels, **options), rtol=PEER_GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", CORE_DTYPES, ids=dtype_id)
def test_torch_edge_values(rng, kernel_path, dtype):
    num_classes = 2 * BLOCK + 904
    logits = random_logits(rng, (5, num_classes), dtype)
    labels = random_labels(rng, (5,), num_classes)
    logits[0, :BLOCK] = -np.inf
    labels[0] = BLOCK + 1
    logits[1, labels[1]] = -np.inf
    logits[2, :] = -np.inf
    logits[3, -1] = np.inf
    logits[4, 9] = np.nan
    expected, _ = torch_core_loss_and_grad(logits, labels, reduction="none")
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    assert np.isfinite(expected[0]) and expected[1] == np.inf and np.isnan(expected[2:]).all()
    assert_loss_close(loss, expected, dtype)


@pytest.mark.parametrize("dtype", CORE_DTYPES, ids=dtype_id)
def test_fully_ignored_mean_is_the_one_difference(rng, kernel_path, dtype):
    logits = random_logits(rng, (3, 2 * BLOCK + 904), dtype)
    labels = np.full(3, CORE_IGNORE_INDEX)
    expected, expected_grad = torch_core_loss_and_grad(logits, labels, reduction="mean")
    loss, grad = fastxent.sparse_cross_entropy_with_grad(
        logits, labels, reduction="mean", ignore_index=CORE_IGNORE_INDEX
    )
    # PyTorch divides 0 by 0; fastxent returns 0.0 (SEMANTICS: "mean").
    assert np.isnan(expected)
    assert loss == 0.0
    # The gradients agree: zero in both.
    assert not expected_grad.any()
    assert not grad.any()
    # So does "sum": 0 in both.
    expected_sum, _ = torch_core_loss_and_grad(logits, labels, reduction="sum")
    assert (
        expected_sum
        == 0.0
        == fastxent.sparse_cross_entropy(logits, labels, reduction="sum", ignore_index=CORE_IGNORE_INDEX)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
def test_cuda_gradient_lives_in_pytorchs_memory_and_is_scaled_in_place():
    """CUDA, eagerly: the kept gradient is allocated by PyTorch's caching allocator (CuPy's pool
    does not grow), a scaled loss's backward multiplies it in place (peak memory holds one N x C
    gradient, not two), loss.backward() leaves it as it is, and a second backward through the
    same graph gives the same bits."""
    cupy = pytest.importorskip("cupy")
    torch.manual_seed(0)
    x = torch.randn(64, 50000, device="cuda", requires_grad=True)
    t = torch.randint(0, 50000, (64,), device="cuda")
    grad_bytes = x.numel() * x.element_size()
    pool = cupy.get_default_memory_pool()
    for scale in (1.0, 3.0):
        x.grad = None
        torch.cuda.synchronize()
        used, base = pool.used_bytes(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fxt.cross_entropy(x, t) * scale
        assert torch.cuda.memory_allocated() - base >= grad_bytes
        assert pool.used_bytes() == used
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        assert torch.cuda.max_memory_allocated() - base < 1.5 * grad_bytes
        x.grad = None
        loss.backward()
        torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
        expected = torch.autograd.grad(F.cross_entropy(x, t) * scale, x)[0]
        torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-7)
