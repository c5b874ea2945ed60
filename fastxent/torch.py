"""PyTorch drop-in: ``cross_entropy`` and ``CrossEntropyLoss`` computed by fastxent's fused kernel.

Same signature and semantics as ``torch.nn.functional.cross_entropy`` and
``torch.nn.CrossEntropyLoss``: class-index targets (``ignore_index=-100``, ``weight``,
``label_smoothing``, every reduction; a "mean" divided by the sum of the targets' weights, and
NaN when that sum is 0, as PyTorch) and probability targets (the input's shape, float).

The forward pass computes the loss and its gradient in one fused call and keeps the gradient;
the backward pass only scales it by the incoming gradient. Tensors are exchanged without
copies through DLPack: CPU tensors with NumPy, CUDA tensors with CuPy (fastxent's GPU backend,
on PyTorch's current stream). Import this module explicitly: ``import fastxent.torch``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastxent._api import sparse_cross_entropy_with_grad, sparse_cross_entropy
from fastxent._dense_api import categorical_cross_entropy, categorical_cross_entropy_with_grad
from fastxent.distributed._torch import vocab_parallel_cross_entropy  # noqa: F401  (re-export)

__all__ = ["CrossEntropyLoss", "TargetOutOfBoundsError", "cross_entropy"]

_REDUCTIONS = ("none", "mean", "sum")


class TargetOutOfBoundsError(ValueError, IndexError):
    """A class index outside [0, C) that is not ``ignore_index``.

    fastxent reports it as a ``ValueError``; it is also an ``IndexError``, the type PyTorch raises,
    so code written for ``torch.nn.functional.cross_entropy`` keeps catching it.
    """


# ----------------------------------------------------------------------------------------
# Zero-copy exchange
# ----------------------------------------------------------------------------------------


def _bfloat16_numpy():
    from ml_dtypes import bfloat16

    return np.dtype(bfloat16)


def _cupy():
    """CuPy, through fastxent's GPU backend (which raises an install hint without it)."""
    from fastxent.gpu import load_backend

    return load_backend()[0]


def _to_array(tensor: torch.Tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing the tensor's memory."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        if tensor.dtype == torch.bfloat16:
            raise TypeError(
                "bfloat16 CUDA tensors cannot be handed to fastxent's GPU backend yet (CuPy has no "
                "bfloat16 dtype); use float16 or float32 logits"
            )
        return _cupy().from_dlpack(tensor)
    if tensor.device.type != "cpu":
        raise TypeError(f"fastxent takes CPU or CUDA tensors; got a tensor on {tensor.device}")
    if tensor.dtype == torch.bfloat16:
        # NumPy has no bfloat16 in DLPack: view the bits as int16, then as ml_dtypes' bfloat16.
        return np.from_dlpack(tensor.view(torch.int16)).view(_bfloat16_numpy())
    return np.from_dlpack(tensor)


def _to_tensor(array) -> torch.Tensor:
    """A tensor sharing the array's memory: on the CPU for NumPy, on the GPU for CuPy."""
    if isinstance(array, np.ndarray):
        if array.dtype == _bfloat16_numpy():
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


@contextlib.contextmanager
def _device_stream(tensor: torch.Tensor):
    """Launch CuPy work on PyTorch's current stream of the tensor's device (nothing on the CPU)."""
    if tensor.device.type != "cuda":
        yield
        return
    cupy = _cupy()
    with cupy.cuda.Device(tensor.device.index), cupy.cuda.ExternalStream(
        torch.cuda.current_stream(tensor.device).cuda_stream
    ):
        yield


# ----------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------


def _class_axis(input: torch.Tensor) -> int:
    """PyTorch's class dimension: 1 for (N, C, d1, ...), 0 for an unbatched (C,) input."""
    return 0 if input.dim() == 1 else 1


def _nothing_counted(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int) -> bool:
    """Whether PyTorch's "mean" divides by zero: no counted row, or counted rows of weight 0."""
    counted = target != ignore_index
    if weight is None:
        return not bool(counted.any())
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return float(torch.where(counted, weight[safe], zero).sum()) == 0.0


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward: loss and gradient in one fused call. Backward: scale the kept gradient."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing):
        class_axis = _class_axis(input)
        want_grad = ctx.needs_input_grad[0]
        probabilities = target.is_floating_point()
        if probabilities and ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        logits = _to_array(input)
        class_weight = None if weight is None else _to_array(weight)
        with _device_stream(input):
            if probabilities:
                targets = _to_array(target)
                # PyTorch divides a "mean" over probability targets by the number of rows.
                core_reduction = "sum_over_batch_size" if reduction == "mean" else reduction
                run = categorical_cross_entropy_with_grad if want_grad else categorical_cross_entropy
                result = run(logits, targets, reduction=core_reduction, label_smoothing=label_smoothing,
                             class_weight=class_weight, axis=class_axis)
            else:
                labels = _to_array(target)
                run = sparse_cross_entropy_with_grad if want_grad else sparse_cross_entropy
                try:
                    result = run(logits, labels, reduction=reduction, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, class_weight=class_weight,
                                 axis=class_axis)
                except ValueError as error:
                    if "outside the valid range" in str(error):
                        raise TargetOutOfBoundsError(str(error)) from None
                    raise
        loss_array, grad_array = result if want_grad else (result, None)
        out_dtype = torch.promote_types(input.dtype, target.dtype) if probabilities else input.dtype
        loss = _to_tensor(loss_array).to(out_dtype)
        grad = None if grad_array is None else _to_tensor(grad_array)

        # fastxent's "mean" is 0.0 when there is nothing to divide by; PyTorch's is NaN (0 / 0),
        # and its gradient is NaN on every counted row.
        num_rows = target.numel() if not probabilities else input.numel() // max(input.shape[class_axis], 1)
        if reduction == "mean" and float(loss) == 0.0 and (
            num_rows == 0 or (not probabilities and _nothing_counted(target, weight, ignore_index))
        ):
            loss = torch.full_like(loss, float("nan"))
            if grad is not None and not probabilities:
                counted = (target != ignore_index).unsqueeze(class_axis).expand_as(grad)
                grad = grad.masked_fill(counted, float("nan"))

        ctx.grad = grad
        ctx.class_axis = class_axis
        ctx.per_row = reduction == "none"
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = ctx.grad
        if ctx.per_row:
            grad_input = grad * grad_output.unsqueeze(ctx.class_axis).to(grad.dtype)
        elif grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            # The usual case, loss.backward(): the kept gradient is the answer, no N x C multiply.
            grad_input = grad
        else:
            grad_input = grad * grad_output.to(grad.dtype)
        return grad_input, None, None, None, None, None


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy``, computed by fastxent's fused kernel.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...): float16, bfloat16, float32 or float64.
        target: class indices (the input's shape without C) or class probabilities (the input's
            shape, floating point).
        weight: (C,) weight per class.
        size_average, reduce: deprecated, as in PyTorch (they override ``reduction``).
        ignore_index: a target value that is ignored (class-index targets only).
        reduction: "none", "mean" or "sum".
        label_smoothing: in [0, 1].

    Returns:
        The loss, in the input's dtype; the target's shape for "none".
    """
    if size_average is not None or reduce is not None:
        reduction = nn._reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("cross_entropy takes tensors for input and target")
    return _FusedCrossEntropy.apply(input, target, weight, int(ignore_index), reduction, float(label_smoothing))


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor, buffers and state dict) whose forward
    runs fastxent's fused kernel."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)
