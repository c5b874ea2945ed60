"""fastxent against torch.nn.functional.cross_entropy, loss and autograd gradient, float32 and float64.

One deliberate difference: a "mean" over rows that are all ignored is NaN in PyTorch (0 / 0) and
0.0 in fastxent (the gradient is zero in both) (``test_fully_ignored_mean_is_the_one_difference``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import (  # noqa: E402
    BLOCK,
    PEER_GRAD_RTOL,
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

pytestmark = pytest.mark.peers

IGNORE_INDEX = -100  # PyTorch's default ignore_index
TORCH_REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# (logits shape, class axis): PyTorch puts the classes on axis 1 of (N, C, d1, ...).
SHAPES = (((6, 2 * BLOCK + 904), 1), ((2, 1000, 3), 1), ((4, 7), 1))

OPTIONS = ("plain", "ignore_index", "label_smoothing", "weight", "everything")


def torch_loss_and_grad(logits, labels, **options):
    """F.cross_entropy and the autograd gradient of its sum (of the rows for "none")."""
    weight = options.pop("weight", None)
    inputs = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        inputs, torch.tensor(labels), weight=None if weight is None else torch.tensor(weight), **options
    )
    loss.sum().backward()
    return loss.detach().numpy(), inputs.grad.numpy()


def make_options(rng, option, num_classes):
    options = {}
    if option in ("ignore_index", "everything"):
        options["ignore_index"] = IGNORE_INDEX
    if option in ("label_smoothing", "everything"):
        options["label_smoothing"] = 0.15
    if option in ("weight", "everything"):
        options["weight"] = random_class_weight(rng, num_classes)
    return options


@pytest.mark.parametrize("reduction", TORCH_REDUCTIONS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=lambda case: str(case))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_torch_cross_entropy(rng, kernel_path, dtype, shape, axis, option, reduction):
    num_classes = shape[axis]
    lead_shape = tuple(np.delete(np.array(shape), axis))
    logits = random_logits(rng, shape, dtype)
    labels = random_labels(rng, lead_shape, num_classes)
    torch_options = make_options(rng, option, num_classes)
    if "weight" in torch_options:  # PyTorch wants the weights in the logits' dtype
        torch_options["weight"] = torch_options["weight"].astype(dtype)
    if "ignore_index" in torch_options:
        labels = ignored_labels(rng, labels, IGNORE_INDEX)
    expected, expected_grad = torch_loss_and_grad(logits, labels, reduction=reduction, **torch_options)

    options = dict(torch_options, axis=axis, reduction=reduction)
    options["class_weight"] = options.pop("weight", None)
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, **options)
    assert loss.dtype == expected.dtype == dtype
    assert loss.shape == expected.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_loss_close(loss, expected, dtype)
    assert_loss_close(fastxent.sparse_cross_entropy(logits, labels, **options), expected, dtype)
    assert_grad_close(grad, expected_grad, dtype, scale=gradient_scale(labels, **options), rtol=PEER_GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
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
    expected, _ = torch_loss_and_grad(logits, labels, reduction="none")
    loss = fastxent.sparse_cross_entropy(logits, labels, reduction="none")
    assert np.isfinite(expected[0]) and expected[1] == np.inf and np.isnan(expected[2:]).all()
    assert_loss_close(loss, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fully_ignored_mean_is_the_one_difference(rng, kernel_path, dtype):
    logits = random_logits(rng, (3, 2 * BLOCK + 904), dtype)
    labels = np.full(3, IGNORE_INDEX)
    expected, expected_grad = torch_loss_and_grad(logits, labels, reduction="mean")
    loss, grad = fastxent.sparse_cross_entropy_with_grad(logits, labels, reduction="mean", ignore_index=IGNORE_INDEX)
    # PyTorch divides 0 by 0; fastxent returns 0.0 (SEMANTICS: "mean").
    assert np.isnan(expected)
    assert loss == 0.0
    # The gradients agree: zero in both.
    assert not expected_grad.any()
    assert not grad.any()
    # So does "sum": 0 in both.
    expected_sum, _ = torch_loss_and_grad(logits, labels, reduction="sum")
    assert (
        expected_sum == 0.0 == fastxent.sparse_cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    )
