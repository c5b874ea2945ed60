"""fastxent.torch.token_stats / linear_token_stats: values and gradients against the float64
autograd composition, the custom operators under torch.library.opcheck and torch.compile, and
bfloat16 gradients at least as accurate as PyTorch's own bfloat16 composition."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BFLOAT16, assert_at_least_naive_accuracy

torch = pytest.importorskip("torch")
import fastxent.torch as ft  # noqa: E402
from fastxent import reference  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _composition(logits, target, temperature=1.0, softcap=None, ignore_index=-100):
    """logprob, entropy, lse from PyTorch's own ops (in the logits' dtype)."""
    values = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    z = values / temperature
    log_p = torch.log_softmax(z, dim=-1)
    counted = target != ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target))
    logprob = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    # p log p with p = 0 where the class is masked (0 * -inf would be NaN, also in the backward).
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    zero = torch.zeros_like(logprob)
    return torch.where(counted, logprob, zero), torch.where(counted, entropy, zero), torch.logsumexp(z, dim=-1)


def _inputs(rng, shape, num_classes, dtype):
    logits = torch.from_numpy(rng.standard_normal(shape + (num_classes,)) * 3).to(dtype)
    logits[0, :5] = -float("inf")
    target = torch.from_numpy(rng.integers(0, num_classes, shape))
    target[0] = 7
    target[1] = -100
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_joint_gradient_match_float64_autograd(rng, dtype):
    logits, target = _inputs(rng, (4,), 2100, dtype)
    weights = torch.from_numpy(rng.standard_normal((3, 4)))
    for temperature, softcap in ((1.0, None), (0.6, 3.0)):
        x = logits.clone().requires_grad_(True)
        stats = ft.token_stats(x, target, temperature=temperature, softcap=softcap)
        assert stats.logprob.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert stats.argmax.dtype == torch.int64
        loss = sum((w * v.double()).sum() for w, v in zip(weights, stats[:3], strict=True))
        loss.backward()

        x64 = logits.detach().double().clone().requires_grad_(True)
        expected = _composition(x64, target, temperature, softcap)
        sum((w * v).sum() for w, v in zip(weights, expected, strict=True)).backward()
        for got, want in zip(stats[:3], expected, strict=True):
            torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=2e-5)
        ref = reference.token_stats(
            logits.double().numpy(), target.numpy(), temperature=temperature, softcap=softcap, ignore_index=-100
        )
        np.testing.assert_array_equal(stats.argmax.numpy(), ref[3])
        tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        scale = float(x64.grad.abs().max())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * scale)
        assert x.grad[1].any()  # the ignored row: its lse has a gradient


def test_only_logprob_or_only_entropy(rng):
    logits, target = _inputs(rng, (3,), 50, torch.float64)
    for pick in (0, 1):
        x = logits.clone().requires_grad_(True)
        ft.token_stats(x, target)[pick].sum().backward()
        x64 = logits.clone().requires_grad_(True)
        _composition(x64, target)[pick].sum().backward()
        torch.testing.assert_close(x.grad, x64.grad)
        assert not x.grad[1].any()  # the ignored row passes no gradient


def test_bfloat16_gradient_at_least_as_accurate_as_pytorch(rng):
    logits, target = _inputs(rng, (6,), 3000, torch.bfloat16)
    a = torch.from_numpy(rng.standard_normal(6)).float()
    b = torch.from_numpy(rng.standard_normal(6)).float()

    def grad_of(fn, x):
        x = x.clone().requires_grad_(True)
        logprob, entropy = fn(x)[:2]
        (a * logprob.float() + b * entropy.float()).sum().backward()
        return x.grad.float().numpy()

    fused = grad_of(lambda x: ft.token_stats(x, target, temperature=0.7), logits)
    naive = grad_of(lambda x: _composition(x, target, 0.7), logits)
    _, ref = reference.token_stats_with_grad(
        logits.float().numpy(), target.numpy(), a.numpy(), b.numpy(), temperature=0.7, ignore_index=-100
    )
    assert_at_least_naive_accuracy(fused, ref, naive, BFLOAT16, "grad")


def test_shapes_and_dim(rng):
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    target = torch.randint(0, 11, (2, 3))
    stats = ft.token_stats(logits, target)
    assert stats.entropy.shape == (2, 3)
    moved = ft.token_stats(logits.transpose(1, 2), target, dim=1)
    for x, y in zip(stats, moved, strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="target shape"):
        ft.token_stats(logits, target[:, :2])
    with pytest.raises(TypeError, match="integer"):
        ft.token_stats(logits, target.double())


def test_custom_ops_opcheck_and_compile(rng):
    logits, target = _inputs(rng, (3,), 40, torch.float32)
    saved = torch.ops.fastxent.token_stats(logits, target, 1.0, None, -100)[4]
    grads = [torch.randn(3) for _ in range(3)]
    torch.library.opcheck(torch.ops.fastxent.token_stats.default, (logits.requires_grad_(True), target, 0.8, 2.0, -100))
    torch.library.opcheck(
        torch.ops.fastxent.token_stats_backward.default, (logits.detach(), target, saved, *grads, 1.0, None, -100)
    )

    def loss_fn(x, y):
        stats = ft.token_stats(x, y, temperature=0.8)
        return (stats.logprob - 0.01 * stats.entropy).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x1 = logits.detach().clone().requires_grad_(True)
    x2 = logits.detach().clone().requires_grad_(True)
    compiled(x1, target).backward()
    loss_fn(x2, target).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_linear_token_stats_gradients(rng, dtype):
    hidden = torch.from_numpy(rng.standard_normal((2, 3, 16))).to(dtype).requires_grad_(True)
    weight = torch.from_numpy(rng.standard_normal((700, 16))).to(dtype).requires_grad_(True)
    bias = torch.from_numpy(rng.standard_normal(700)).to(dtype).requires_grad_(True)
    target = torch.from_numpy(rng.integers(0, 700, (2, 3)))
    target[1, 2] = -100
    stats = ft.linear_token_stats(hidden, weight, target, bias, temperature=1.5, softcap=20.0)
    (stats.logprob.double().sum() + 0.3 * stats.entropy.double().sum() + 0.1 * stats.lse.double().sum()).backward()
    fused = [t.grad.double() for t in (hidden, weight, bias)]

    tensors = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*tensors)
    logprob, entropy, lse = _composition(logits, target, 1.5, 20.0)
    (logprob.sum() + 0.3 * entropy.sum() + 0.1 * lse.sum()).backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for got, t in zip(fused, tensors, strict=True):
        torch.testing.assert_close(got, t.grad, rtol=tol, atol=tol * float(t.grad.abs().max()))
    for got, want in zip(stats[:3], (logprob, entropy, lse), strict=True):
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)

    frozen = weight.detach()
    h = hidden.detach().clone().requires_grad_(True)
    ft.linear_token_stats(h, frozen, target).logprob.sum().backward()
    assert h.grad.shape == hidden.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
def test_linear_token_stats_on_cuda_tensors():
    """fastxent.torch.linear_token_stats on CUDA tensors (the GPU path): the values and the
    gradients of input, weight and bias equal the CPU tensors' (float32)."""
    pytest.importorskip("cupy")
    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 64)
    weight = torch.randn(3000, 64) * 0.1
    bias = torch.randn(3000) * 0.1
    target = torch.randint(0, 3000, (4, 7))
    target[0, 1] = -100

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (hidden, weight, bias)]
        stats = ft.linear_token_stats(leaves[0], leaves[1], target.to(device), leaves[2], temperature=0.9)
        (stats.logprob.sum() - 0.1 * stats.entropy.sum()).backward()
        return [t.detach().cpu() for t in stats[:3]] + [stats.argmax.cpu()] + [t.grad.cpu() for t in leaves]

    for got, expected in zip(run("cuda"), run("cpu"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
