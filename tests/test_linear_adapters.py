"""The linear + cross-entropy adapters: ``fastxent.torch.linear_cross_entropy`` against the float64
composition and against PyTorch's own ``F.linear_cross_entropy`` (values and the gradients of
input, linear_weight and linear_bias, every option and reduction, float32 and bfloat16, a
frozen head, gradcheck, PyTorch's errors); ``fastxent.jax.linear_cross_entropy`` against optax
on materialised logits; ``fastxent.keras.LinearCrossEntropy`` in ``model.fit`` against Dense +
SparseCategoricalCrossentropy. Each framework's tests are skipped where it is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import (
    BFLOAT16,
    assert_at_least_naive_accuracy,
    random_class_weight,
)

from fastxent import reference

pytestmark = pytest.mark.peers

NUM_ROWS = 24
FEATURES = 32
NUM_CLASSES = 1000

# Options PyTorch's F.linear_cross_entropy has, and fastxent's two extras.
TORCH_OPTIONS = ("plain", "ignore_index", "label_smoothing", "class_weight", "smoothing_and_class_weight")
EXTRA_OPTIONS = ("softcap", "z_loss", "everything")


def random_head(rng, num_rows=NUM_ROWS, features=FEATURES, num_classes=NUM_CLASSES):
    """float32 (hidden (N, H), weight (V, H), bias (V,)) with logits of a few units."""
    hidden = rng.standard_normal((num_rows, features)).astype(np.float32)
    weight = (rng.standard_normal((num_classes, features)) * (2.0 / np.sqrt(features))).astype(np.float32)
    bias = (rng.standard_normal(num_classes) * 0.5).astype(np.float32)
    return hidden, weight, bias


def random_targets(rng, option, num_rows=NUM_ROWS, num_classes=NUM_CLASSES):
    """int64 labels and the torch-named options (``weight`` a float64 array) of one option set."""
    labels = rng.integers(0, num_classes, num_rows)
    options = {}
    if option in ("ignore_index", "everything"):
        options["ignore_index"] = -100 if option == "everything" else 7  # a real class may be ignored
        ignored = rng.random(num_rows) < 0.3
        ignored[0] = False
        labels[ignored] = options["ignore_index"]
    if option in ("label_smoothing", "smoothing_and_class_weight", "everything"):
        options["label_smoothing"] = 0.1
    if option in ("class_weight", "smoothing_and_class_weight", "everything"):
        options["weight"] = random_class_weight(rng, num_classes)
    if option in ("softcap", "everything"):
        options["softcap"] = 5.0
    if option in ("z_loss", "everything"):
        options["z_loss"] = 1e-3
    return labels, options


def reference_options(options, reduction):
    """The torch-named options in fastxent.reference's names."""
    translated = {k: v for k, v in options.items() if k != "weight"}
    translated.setdefault("ignore_index", -100)
    translated["class_weight"] = options.get("weight")
    translated["reduction"] = reduction
    return translated


def upstream_for(rng, reduction, num_rows=NUM_ROWS):
    """An incoming gradient: a scalar other than 1, or one factor per row (non-uniform)."""
    return np.float64(1.7) if reduction != "none" else rng.uniform(-1.0, 2.0, num_rows)


def reference_result(hidden, weight, bias, labels, options, reduction, upstream):
    """float64 loss, and the gradients of sum(upstream * loss)."""
    opts = reference_options(options, reduction)
    loss = reference.linear_cross_entropy(hidden, weight, labels, bias=bias, **opts)
    if reduction == "none":
        # sum_i g_i loss_i is the "sum" of the rows weighted by g.
        opts.update(reduction="sum", sample_weight=upstream)
        _, *grads = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **opts)
    else:
        _, *grads = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias, **opts)
        grads = [g * upstream for g in grads]
    return loss, grads


def assert_gemm_close(got, ref, *, rtol=2e-5):
    """float32 GEMM outputs: relative to each entry plus float32 accumulation error of the largest."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-6)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=4e-6 * scale)


# ----------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def torch_head(torch, hidden, weight, bias, dtype=None, *, requires_grad=(True, True, True)):
    tensors = []
    for array, needs in zip((hidden, weight, bias), requires_grad, strict=True):
        if array is None:
            tensors.append(None)
            continue
        tensor = torch.tensor(array)
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensors.append(tensor.requires_grad_(needs))
    return tensors


def torch_options(torch, options, dtype):
    found = dict(options)
    if "weight" in found:
        found["weight"] = torch.tensor(found["weight"]).to(dtype)
    return found


def run_torch(torch, function, tensors, labels, options, reduction, upstream):
    """(loss, grads of input, linear_weight, linear_bias) as float64 arrays."""
    x, w, b = tensors
    loss = function(x, w, torch.tensor(labels), linear_bias=b, reduction=reduction, **options)
    grads = torch.autograd.grad(loss, tensors, torch.tensor(upstream).to(loss.dtype))
    return loss.detach().double().numpy(), [g.double().numpy() for g in grads]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", TORCH_OPTIONS + EXTRA_OPTIONS)
def test_torch_matches_float64_composition(torch, rng, option, reduction):
    import fastxent.torch as fxt

    hidden, weight, bias = random_head(rng)
    labels, options = random_targets(rng, option)
    upstream = upstream_for(rng, reduction)
    tensors = torch_head(torch, hidden, weight, bias)
    loss, grads = run_torch(
        torch,
        fxt.linear_cross_entropy,
        tensors,
        labels,
        torch_options(torch, options, torch.float32),
        reduction,
        upstream,
    )
    ref_loss, ref_grads = reference_result(hidden, weight, bias, labels, options, reduction, upstream)
    assert loss.shape == np.shape(ref_loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=2e-5)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert_gemm_close(got, ref)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", TORCH_OPTIONS)
def test_torch_matches_F_linear_cross_entropy(torch, rng, option, reduction, with_bias):
    import fastxent.torch as fxt

    F = torch.nn.functional
    hidden, weight, bias = random_head(rng)
    labels, options = random_targets(rng, option)
    upstream = upstream_for(rng, reduction)
    options = torch_options(torch, options, torch.float32)
    results = []
    for function in (fxt.linear_cross_entropy, F.linear_cross_entropy):
        tensors = torch_head(torch, hidden, weight, bias if with_bias else None)
        x, w, b = tensors
        loss = function(x, w, torch.tensor(labels), linear_bias=b, reduction=reduction, **options)
        assert loss.dtype == torch.float32
        wrt = [t for t in tensors if t is not None]
        grads = torch.autograd.grad(loss, wrt, torch.tensor(upstream, dtype=torch.float32))
        results.append((loss.detach().numpy(), [g.numpy() for g in grads]))
    (loss, grads), (peer_loss, peer_grads) = results
    np.testing.assert_allclose(loss, peer_loss, rtol=1e-5, atol=2e-5)
    # PyTorch's own float32 result carries its own rounding: a little wider than against float64.
    for got, expected in zip(grads, peer_grads, strict=True):
        assert_gemm_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", ["plain", "smoothing_and_class_weight"])
def test_torch_bfloat16_at_least_as_accurate_as_torch(torch, rng, option, reduction):
    """bfloat16: no value less accurate than PyTorch's unfused computation in bfloat16, nor than
    its F.linear_cross_entropy in bfloat16 (both against the float64 composition of the same
    bfloat16 inputs)."""
    import fastxent.torch as fxt

    F = torch.nn.functional
    hidden, weight, bias = (a.astype(BFLOAT16) for a in random_head(rng))
    labels, options = random_targets(rng, option)
    upstream = upstream_for(rng, reduction)
    # The incoming gradient reaches every party in bfloat16 (the loss's dtype): the reference
    # takes the same rounded values. "mean" gets loss.backward()'s 1.
    upstream = upstream.astype(BFLOAT16).astype(np.float64) if reduction == "none" else np.float64(1.0)
    if "weight" in options:  # class weights representable in bfloat16, the same for every party
        options["weight"] = options["weight"].astype(BFLOAT16).astype(np.float64)
    ref_loss, ref_grads = reference_result(hidden, weight, bias, labels, options, reduction, upstream)
    f32 = [a.astype(np.float32) for a in (hidden, weight, bias)]
    opts = torch_options(torch, options, torch.bfloat16)

    def unfused(x, w, t, *, linear_bias, **kwargs):
        return F.cross_entropy(F.linear(x, w, linear_bias), t, **kwargs)

    got = run_torch(
        torch, fxt.linear_cross_entropy, torch_head(torch, *f32, torch.bfloat16), labels, opts, reduction, upstream
    )
    for peer in (unfused, F.linear_cross_entropy):
        naive = run_torch(torch, peer, torch_head(torch, *f32, torch.bfloat16), labels, opts, reduction, upstream)
        assert_at_least_naive_accuracy(got[0], ref_loss, naive[0], BFLOAT16, "loss")
        for g, r, n in zip(got[1], ref_grads, naive[1], strict=True):
            assert_at_least_naive_accuracy(g, r, n, BFLOAT16, "grad")


@pytest.fixture
def launcher_calls(monkeypatch):
    """Records which gradients each call of the CPU linear launcher is asked for."""
    from fastxent.cpu import linear as cpu_linear

    calls = []
    original = cpu_linear.linear_xent

    def recording(*args, **kwargs):
        calls.append({k: kwargs.get(k, False) for k in ("want_hidden", "want_weight", "want_bias")})
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_linear, "linear_xent", recording)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_frozen_head_computes_no_weight_gradient(torch, rng, launcher_calls, reduction):
    import fastxent.torch as fxt

    F = torch.nn.functional
    hidden, weight, bias = random_head(rng)
    labels, _ = random_targets(rng, "plain")
    upstream = torch.tensor(upstream_for(rng, reduction), dtype=torch.float32)
    x, w, b = torch_head(torch, hidden, weight, bias, requires_grad=(True, False, False))
    loss = fxt.linear_cross_entropy(x, w, torch.tensor(labels), linear_bias=b, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, [x], upstream)
    assert launcher_calls and all(not c["want_weight"] and not c["want_bias"] for c in launcher_calls)
    assert any(c["want_hidden"] for c in launcher_calls)
    xp = torch.tensor(hidden, requires_grad=True)
    peer = F.linear_cross_entropy(xp, w, torch.tensor(labels), linear_bias=b, reduction=reduction)
    (expected,) = torch.autograd.grad(peer, [xp], upstream)
    assert_gemm_close(grad.numpy(), expected.numpy(), rtol=1e-4)

    # A trainable bias on a frozen weight: the bias gradient, still no weight gradient.
    launcher_calls.clear()
    x, w, b = torch_head(torch, hidden, weight, bias, requires_grad=(False, False, True))
    loss = fxt.linear_cross_entropy(x, w, torch.tensor(labels), linear_bias=b, reduction=reduction)
    torch.autograd.grad(loss, [b], upstream)
    assert launcher_calls and all(not c["want_weight"] and not c["want_hidden"] for c in launcher_calls)
    assert any(c["want_bias"] for c in launcher_calls)


def test_torch_without_gradients_runs_the_loss_alone(torch, rng, launcher_calls):
    import fastxent.torch as fxt

    hidden, weight, bias = random_head(rng)
    labels, _ = random_targets(rng, "plain")
    with torch.no_grad():
        fxt.linear_cross_entropy(*torch_head(torch, hidden, weight, bias)[:2], torch.tensor(labels))
    assert launcher_calls == [{"want_hidden": False, "want_weight": False, "want_bias": False}]


def test_torch_mean_forward_computes_the_gradients_once(torch, rng, launcher_calls):
    """ "mean": the forward computes the loss and the three gradients in one call, the backward
    none; "none": the forward the loss, the backward the gradients (one call each)."""
    import fastxent.torch as fxt

    hidden, weight, bias = random_head(rng)
    labels, _ = random_targets(rng, "plain")
    x, w, b = torch_head(torch, hidden, weight, bias)
    fxt.linear_cross_entropy(x, w, torch.tensor(labels), linear_bias=b).backward()
    assert launcher_calls == [{"want_hidden": True, "want_weight": True, "want_bias": True}]
    launcher_calls.clear()
    fxt.linear_cross_entropy(x, w, torch.tensor(labels), linear_bias=b, reduction="none").sum().backward()
    assert launcher_calls == [
        {"want_hidden": False, "want_weight": False, "want_bias": False},
        {"want_hidden": True, "want_weight": True, "want_bias": True},
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_gradcheck_float64(torch, reduction):
    """First derivatives (fused) and second derivatives (PyTorch's ops) against finite differences."""
    import fastxent.torch as fxt

    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((4, 3), (7, 3), (7,)))
    target = torch.tensor([1, -100, 6, 0])
    class_weight = torch.rand(7, generator=generator, dtype=torch.float64) + 0.5

    def loss(x, w, b):
        return fxt.linear_cross_entropy(
            x,
            w,
            target,
            linear_bias=b,
            weight=class_weight,
            reduction=reduction,
            label_smoothing=0.1,
            softcap=3.0,
            z_loss=1e-2,
        )

    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


def test_torch_none_with_per_row_grad_output(torch, rng):
    """reduction "none" with a different incoming gradient per row (and some rows 0)."""
    import fastxent.torch as fxt

    F = torch.nn.functional
    hidden, weight, bias = random_head(rng)
    labels, options = random_targets(rng, "smoothing_and_class_weight")
    options = torch_options(torch, options, torch.float32)
    upstream = torch.tensor(rng.uniform(0.0, 3.0, NUM_ROWS), dtype=torch.float32)
    upstream[::5] = 0.0
    results = []
    for function in (fxt.linear_cross_entropy, F.linear_cross_entropy):
        x, w, b = torch_head(torch, hidden, weight, bias)
        loss = function(x, w, torch.tensor(labels), linear_bias=b, reduction="none", **options)
        (loss * upstream).sum().backward()
        results.append([x.grad.numpy(), w.grad.numpy(), b.grad.numpy()])
    for got, expected in zip(*results, strict=True):
        assert_gemm_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize(
    "labels, class_weight",
    [([-100, -100, -100], None), ([0, 0, -100], [0.0, 1.0, 1.0, 1.0, 1.0])],
    ids=["all-ignored", "counted-rows-of-weight-0"],
)
def test_torch_mean_over_nothing_is_nan_as_pytorch(torch, labels, class_weight):
    import fastxent.torch as fxt

    F = torch.nn.functional
    generator = torch.Generator().manual_seed(1)
    arrays = [torch.randn(shape, generator=generator) for shape in ((3, 4), (5, 4), (5,))]
    weight = None if class_weight is None else torch.tensor(class_weight)
    results = []
    for function in (fxt.linear_cross_entropy, F.linear_cross_entropy):
        x, w, b = (a.clone().requires_grad_() for a in arrays)
        loss = function(x, w, torch.tensor(labels), linear_bias=b, weight=weight)
        loss.backward()
        results.append([loss.detach(), x.grad, w.grad, b.grad])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isnan(results[0][0])


def test_torch_unbatched_smoothing_one_and_probability_targets(torch, rng):
    """The cases PyTorch allows that the kernel does not take are still PyTorch's numbers."""
    import fastxent.torch as fxt

    F = torch.nn.functional
    hidden, weight, bias = random_head(rng, num_rows=5, num_classes=11)
    probabilities = torch.softmax(torch.tensor(rng.standard_normal((5, 11)), dtype=torch.float32), -1)
    cases = [
        (lambda t: t[0][0], torch.tensor(3), {}),  # unbatched (H,) input, 0-d target
        (lambda t: t[0], torch.tensor([1, 2, 3, 4, 5]), {"label_smoothing": 1.0}),
        (lambda t: t[0], probabilities, {}),
    ]
    for pick, target, options in cases:
        results = []
        for function in (fxt.linear_cross_entropy, F.linear_cross_entropy):
            tensors = torch_head(torch, hidden, weight, bias)
            loss = function(pick(tensors), tensors[1], target, linear_bias=tensors[2], **options)
            grads = torch.autograd.grad(loss, tensors)
            results.append([loss, *grads])
        for got, expected in zip(*results, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _bad_calls(torch):
    x, w = torch.randn(4, 3), torch.randn(7, 3)
    t = torch.tensor([0, 1, 2, 3])
    return {
        "label-out-of-range": ((x, w, torch.tensor([0, 1, 7, 3])), {}, IndexError),
        "negative-label": ((x, w, torch.tensor([0, -1, 2, 3])), {}, IndexError),
        "features-mismatch": ((x, torch.randn(7, 4), t), {}, RuntimeError),
        "weight-1d": ((x, torch.randn(7), t), {}, RuntimeError),
        "input-3d": ((x[None], w, t[None]), {}, RuntimeError),
        "bias-length": ((x, w, t), {"linear_bias": torch.randn(6)}, RuntimeError),
        "dtype-mismatch": ((x, w.double(), t), {}, RuntimeError),
        "target-shape": ((x, w, t[:3]), {}, ValueError),
        "float-target-wrong-shape": ((x, w, t.float()), {}, RuntimeError),
        "class-weight-length": ((x, w, t), {"weight": torch.ones(6)}, RuntimeError),
        "class-weight-requires-grad": ((x, w, t), {"weight": torch.ones(7, requires_grad=True)}, RuntimeError),
        "smoothing-above-one": ((x, w, t), {"label_smoothing": 1.5}, RuntimeError),
        "reduction": ((x, w, t), {"reduction": "batchmean"}, ValueError),
        "ignore-index-with-probabilities": ((x, w, torch.rand(4, 7)), {"ignore_index": -100}, RuntimeError),
    }


BAD_CASES = (
    "label-out-of-range",
    "negative-label",
    "features-mismatch",
    "weight-1d",
    "input-3d",
    "bias-length",
    "dtype-mismatch",
    "target-shape",
    "float-target-wrong-shape",
    "class-weight-length",
    "class-weight-requires-grad",
    "smoothing-above-one",
    "reduction",
    "ignore-index-with-probabilities",
)


@pytest.mark.parametrize("case", BAD_CASES)
def test_torch_bad_input_raises_pytorchs_exception_types(torch, case):
    """Every bad call raises the exception type PyTorch's own function raises for it (checked
    on PyTorch too), and fastxent's errors are also ValueErrors."""
    import fastxent.torch as fxt

    F = torch.nn.functional
    args, kwargs, error = _bad_calls(torch)[case]
    with pytest.raises(error):
        F.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(error) as raised:
        fxt.linear_cross_entropy(*args, **kwargs)
    if isinstance(raised.value, (fxt.InvalidInputError, fxt.TargetOutOfBoundsError)):
        assert isinstance(raised.value, ValueError)


def test_torch_devices_the_fused_path_does_not_serve_raise(torch):
    """Tensors on a device without a fused path (here ``meta``; CUDA for now) raise
    NotImplementedError naming the device, from the one place that decides."""
    import fastxent.torch as fxt

    x, w = torch.empty(4, 3, device="meta"), torch.empty(7, 3, device="meta")
    with pytest.raises(NotImplementedError, match="meta"):
        fxt.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(RuntimeError, match="same device"):
        fxt.linear_cross_entropy(torch.randn(4, 3), w, torch.zeros(4, dtype=torch.long))


def test_torch_softcap_with_probability_targets_raises(torch):
    import fastxent.torch as fxt

    with pytest.raises(NotImplementedError, match="softcap"):
        fxt.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), torch.rand(4, 7), softcap=5.0)


def test_torch_training_loop_follows_pytorch(torch, rng):
    """An nn.Linear head trained for a few SGD steps with each loss ends at the same weights."""
    import fastxent.torch as fxt

    F = torch.nn.functional
    hidden, _, _ = random_head(rng)
    labels = torch.tensor(rng.integers(0, 50, NUM_ROWS))
    finals = []
    for function in (fxt.linear_cross_entropy, F.linear_cross_entropy):
        torch.manual_seed(0)
        head = torch.nn.Linear(FEATURES, 50)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            function(torch.tensor(hidden), head.weight, labels, linear_bias=head.bias, label_smoothing=0.1).backward()
            optimizer.step()
        finals.append([p.detach().clone() for p in head.parameters()])
    for got, expected in zip(*finals, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def optax_composition(jnp, optax, hidden, weight, bias, labels, reduction):
    """JAX's own: materialised logits through optax, reduced as fastxent reduces."""
    losses = optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T + bias, labels)
    return losses if reduction == "none" else (losses.mean() if reduction == "mean" else losses.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_jax_grad_under_jit_matches_optax(jax, rng, reduction):
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import fastxent.jax as fxj

    hidden, weight, bias = (jnp.asarray(a) for a in random_head(rng))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, NUM_ROWS))
    upstream = jnp.asarray(rng.uniform(-1.0, 2.0, NUM_ROWS) if reduction == "none" else 1.7, jnp.float32)

    def ours(x, w, b):
        return jnp.sum(fxj.linear_cross_entropy(x, w, labels, bias=b, reduction=reduction) * upstream)

    def peers(x, w, b):
        return jnp.sum(optax_composition(jnp, optax, x, w, b, labels, reduction) * upstream)

    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(hidden, weight, bias)
    peer_value, peer_grads = jax.value_and_grad(peers, argnums=(0, 1, 2))(hidden, weight, bias)
    np.testing.assert_allclose(value, peer_value, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, peer_grads, strict=True):
        assert got.dtype == jnp.float32
        assert_gemm_close(got, expected, rtol=1e-4)


@pytest.mark.parametrize("option", ["ignore_index", "everything"])
def test_jax_options_match_float64_composition(jax, rng, option):
    import jax.numpy as jnp

    import fastxent.jax as fxj

    hidden, weight, bias = random_head(rng)
    labels, options = random_targets(rng, option)
    options = reference_options(options, "mean")
    sample_weight = rng.uniform(0.0, 2.0, NUM_ROWS)
    ref_loss, *ref_grads = reference.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, sample_weight=sample_weight, **options
    )

    def loss(x, w, b):
        return fxj.linear_cross_entropy(x, w, jnp.asarray(labels), bias=b, sample_weight=sample_weight, **options)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(hidden, weight, bias)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5, atol=2e-5)
    for got, ref in zip(grads, ref_grads, strict=True):
        assert_gemm_close(got, ref)


def test_jax_bfloat16_at_least_as_accurate_as_optax(jax, rng):
    """bfloat16: no value less accurate than optax on bfloat16 logits (against the float64
    composition of the same bfloat16 inputs)."""
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import fastxent.jax as fxj

    hidden, weight, bias = (a.astype(BFLOAT16) for a in random_head(rng))
    labels = rng.integers(0, NUM_CLASSES, NUM_ROWS)
    ref_loss, *ref_grads = reference.linear_cross_entropy_with_grad(hidden, weight, labels, bias=bias)
    arrays = [jnp.asarray(a) for a in (hidden, weight, bias)]

    def ours(x, w, b):
        return fxj.linear_cross_entropy(x, w, jnp.asarray(labels), bias=b)

    def naive(x, w, b):
        return optax_composition(jnp, optax, x, w, b, jnp.asarray(labels), "mean")

    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(*arrays)
    peer = jax.value_and_grad(naive, argnums=(0, 1, 2))(*arrays)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    assert_at_least_naive_accuracy(got[0], ref_loss, peer[0], BFLOAT16, "loss")
    for g, r, n in zip(got[1], ref_grads, peer[1], strict=True):
        assert_at_least_naive_accuracy(g, r, n, BFLOAT16, "grad")


def test_jax_vmap_and_frozen_head(jax, rng, launcher_calls):
    """vmap: one independent loss per mapped element; differentiating the hidden states alone
    asks the launcher for no weight gradient."""
    import jax.numpy as jnp

    import fastxent.jax as fxj

    hidden, weight, bias = random_head(rng)
    batch = jnp.asarray(np.stack([hidden, hidden[::-1] * 0.5]))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (2, NUM_ROWS)))

    def loss(x, y):
        return fxj.linear_cross_entropy(x, weight, y, bias=bias)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(batch, labels)
    assert launcher_calls and all(not c["want_weight"] and not c["want_bias"] for c in launcher_calls)
    for index in range(2):
        _, ref_grad, _, _ = reference.linear_cross_entropy_with_grad(
            np.asarray(batch[index]), weight, np.asarray(labels[index]), bias=bias
        )
        assert_gemm_close(grads[index], ref_grad)


def test_jax_forward_mode_and_bad_input_raise(jax, rng):
    import jax.numpy as jnp

    import fastxent.jax as fxj

    hidden, weight, _ = (jnp.asarray(a) for a in random_head(rng, num_classes=11))
    labels = jnp.zeros(NUM_ROWS, jnp.int32)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: fxj.linear_cross_entropy(x, weight, labels), (hidden,), (hidden,))
    with pytest.raises(ValueError, match="weight must be"):
        fxj.linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="labels shape"):
        fxj.linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="label_smoothing"):
        fxj.linear_cross_entropy(hidden, weight, labels, label_smoothing=2.0)
    with pytest.raises(NotImplementedError, match="class_weight"):
        jax.grad(lambda cw: fxj.linear_cross_entropy(hidden, weight, labels, class_weight=cw))(jnp.ones(11))


# ----------------------------------------------------------------------------------------
# Keras
# ----------------------------------------------------------------------------------------


@pytest.fixture
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("fastxent.keras needs the TensorFlow backend")
    return keras


def test_keras_layer_trains_as_dense_with_sparse_crossentropy(keras, rng):
    """Two SGD steps of model.fit: the same losses and the same weights after each epoch as
    Dense + SparseCategoricalCrossentropy(from_logits=True) started from the same weights."""
    import fastxent.keras as fxk

    num_classes = 200
    hidden, _, _ = random_head(rng, num_rows=16, num_classes=num_classes)
    labels = rng.integers(0, num_classes, 16)

    x, y = keras.Input((FEATURES,)), keras.Input((), dtype="int64")
    layer = fxk.LinearCrossEntropy(num_classes)
    fused = keras.Model([x, y], layer([x, y]))
    fused.compile(optimizer=keras.optimizers.SGD(0.5), loss=None, jit_compile=False)
    x2 = keras.Input((FEATURES,))
    dense = keras.layers.Dense(num_classes)
    plain = keras.Model(x2, dense(x2))
    plain.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    # A non-zero bias, so its gradient path is exercised from the first step.
    dense.set_weights([dense.get_weights()[0], rng.standard_normal(num_classes).astype(np.float32)])
    layer.set_weights(dense.get_weights())
    for _ in range(2):
        ours = fused.fit([hidden, labels], None, batch_size=8, epochs=1, shuffle=False, verbose=0)
        theirs = plain.fit(hidden, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
        np.testing.assert_allclose(ours.history["loss"], theirs.history["loss"], rtol=1e-5)
        for got, expected in zip(layer.get_weights(), dense.get_weights(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Inference computes the same loss (the loss alone).
    np.testing.assert_allclose(
        fused.evaluate([hidden, labels], verbose=0), plain.evaluate(hidden, labels, verbose=0), rtol=1e-5
    )


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean", "sum"])
def test_keras_layer_gradients_match_float64_composition(keras, rng, reduction, launcher_calls):
    import tensorflow as tf

    import fastxent.keras as fxk

    hidden, weight, bias = random_head(rng)
    labels, options = random_targets(rng, "everything")
    options = reference_options(options, reduction)
    options["class_weight"] = list(options["class_weight"])
    layer = fxk.LinearCrossEntropy(NUM_CLASSES, **options)
    x = tf.constant(hidden)
    layer([x, labels])  # builds the layer
    layer.set_weights([weight.T, bias])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = layer([x, labels])
    grads = tape.gradient(loss, [x, layer.kernel, layer.bias])
    ref_options = dict(options)
    if reduction == "sum_over_batch_size":
        ref_options["reduction"] = "sum_over_batch_size"
    ref_loss, ref_hidden, ref_weight, ref_bias = reference.linear_cross_entropy_with_grad(
        hidden, weight, labels, bias=bias, **ref_options
    )
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=2e-5)
    for got, ref in zip(grads, (ref_hidden, ref_weight.T, ref_bias), strict=True):
        assert_gemm_close(np.asarray(got), ref)
    assert launcher_calls[-1] == {"want_hidden": True, "want_weight": True, "want_bias": True}

    # A frozen layer: no weight-gradient GEMM, and its config round-trips.
    layer.trainable = False
    launcher_calls.clear()
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = layer([x, labels])
    assert_gemm_close(np.asarray(tape.gradient(loss, x)), ref_hidden)
    assert launcher_calls == [{"want_hidden": True, "want_weight": False, "want_bias": False}]
    clone = fxk.LinearCrossEntropy.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
