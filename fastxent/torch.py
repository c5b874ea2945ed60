"""PyTorch drop-in: ``cross_entropy`` and ``CrossEntropyLoss`` computed by fastxent's fused kernel.

Same signature and semantics as ``torch.nn.functional.cross_entropy`` and
``torch.nn.CrossEntropyLoss``: class-index targets (``ignore_index=-100``, ``weight``,
``label_smoothing``, every reduction; a "mean" divided by the sum of the targets' weights, and
NaN when that sum is 0, as PyTorch) and probability targets (the input's shape, float).

The forward pass computes the loss and its gradient in one fused call and keeps the gradient;
the backward pass only scales it by the incoming gradient, and ``loss.backward()`` hands the
kept gradient to ``.grad`` without a copy. When no gradient can be asked for (``torch.no_grad``,
an input that does not require grad) the forward-only kernel runs.

Every autograd feature of PyTorch's own loss is there, exactly:
- ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``; ``vmap`` runs one
  fused call per mapped element) and forward-mode AD (``jvp``, dual tensors);
- second derivatives (double backward, gradient penalties, Hessian-vector products) and
  gradients with respect to probability targets: these come from PyTorch's own cross-entropy on
  the saved inputs, so they are exact but not fused.

Errors are PyTorch's types too: a label out of range is a ``TargetOutOfBoundsError``
(``ValueError`` and ``IndexError``), a bad shape, dtype or option an ``InvalidInputError``
(``ValueError`` and ``RuntimeError``).

``linear_cross_entropy`` is ``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13) on
fastxent's fused linear + cross-entropy (CPU tensors so far); see its docstring.

Tensors are exchanged without copies through DLPack: CPU tensors with NumPy, CUDA tensors with
CuPy (fastxent's GPU backend, on PyTorch's current stream); see ``fastxent._torch_interop``
(bfloat16 CUDA tensors are accepted, through a float32 copy where CuPy has no bfloat16 dtype).
Import this module explicitly:
``import fastxent.torch``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._C import _functorch
from torch.autograd import forward_ad

from fastxent import _checks as checks
from fastxent import _torch_interop as interop
from fastxent._api import sparse_cross_entropy, sparse_cross_entropy_with_grad
from fastxent._dense_api import (
    categorical_cross_entropy,
    categorical_cross_entropy_with_grad,
)
from fastxent._linear_api import linear_cross_entropy_with_grad
from fastxent._torch_stats import TokenStats, linear_token_stats, token_stats  # noqa: F401  (re-export)
from fastxent.distributed._torch import vocab_parallel_cross_entropy  # noqa: F401  (re-export)
from fastxent.host_buffers import host_output_like

__all__ = [
    "CrossEntropyLoss",
    "InvalidInputError",
    "TargetOutOfBoundsError",
    "cross_entropy",
    "linear_cross_entropy",
]

_REDUCTIONS = ("none", "mean", "sum")


class TargetOutOfBoundsError(ValueError, IndexError):
    """A class index outside [0, C) that is not ``ignore_index``.

    fastxent reports it as a ``ValueError``; it is also an ``IndexError``, the type PyTorch raises,
    so code written for ``torch.nn.functional.cross_entropy`` keeps catching it.
    """


class InvalidInputError(ValueError, RuntimeError):
    """A shape, dtype or option that PyTorch rejects: fastxent's ``ValueError``, also the
    ``RuntimeError`` PyTorch raises for it, so code written for PyTorch keeps catching it."""


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


def _fused_loss_and_grad(input, target, weight, ignore_index, reduction, label_smoothing, want_grad):
    """fastxent's kernel on the tensors' memory: the loss, and d loss / d input when ``want_grad``
    (else an empty placeholder). PyTorch's conventions: "mean" over probability targets divides
    by the number of rows; a "mean" over nothing is NaN."""
    class_axis = _class_axis(input)
    probabilities = target.is_floating_point()
    logits = interop.to_array(input)
    class_weight = None if weight is None else interop.to_array(weight)
    try:
        with interop.on_stream(input):
            if probabilities:
                core_reduction = "sum_over_batch_size" if reduction == "mean" else reduction
                run = categorical_cross_entropy_with_grad if want_grad else categorical_cross_entropy
                result = run(
                    logits,
                    interop.to_array(target),
                    reduction=core_reduction,
                    label_smoothing=label_smoothing,
                    class_weight=class_weight,
                    axis=class_axis,
                )
            else:
                options = dict(
                    reduction=reduction,
                    ignore_index=ignore_index,
                    label_smoothing=label_smoothing,
                    class_weight=class_weight,
                    axis=class_axis,
                )
                if want_grad:
                    # A pooled host buffer: already faulted in when a released gradient is reused.
                    out = host_output_like(logits)
                    result = sparse_cross_entropy_with_grad(logits, interop.to_array(target), out=out, **options)
                else:
                    result = sparse_cross_entropy(logits, interop.to_array(target), **options)
    except ValueError as error:
        if "outside the valid range" in str(error):
            raise TargetOutOfBoundsError(str(error)) from None
        raise InvalidInputError(str(error)) from None
    loss_array, grad_array = result if want_grad else (result, None)
    out_dtype = torch.promote_types(input.dtype, target.dtype) if probabilities else input.dtype
    loss = interop.to_tensor(loss_array).to(out_dtype)
    grad = input.new_empty(0) if grad_array is None else interop.to_tensor(grad_array).to(input.dtype)

    # fastxent's "mean" is 0.0 when there is nothing to divide by; PyTorch's is NaN (0 / 0),
    # and its gradient is NaN on every counted row.
    num_rows = target.numel() if not probabilities else input.numel() // max(input.shape[class_axis], 1)
    if (
        reduction == "mean"
        and float(loss) == 0.0
        and (num_rows == 0 or (not probabilities and _nothing_counted(target, weight, ignore_index)))
    ):
        loss = torch.full_like(loss, float("nan"))
        if grad_array is not None and not probabilities:
            counted = (target != ignore_index).unsqueeze(class_axis).expand_as(grad)
            grad = grad.masked_fill(counted, float("nan"))
    return loss, grad


def _torch_loss(options, input, target, weight):
    """PyTorch's own cross-entropy with the same options: the exact path for derivatives the
    fused kernel does not provide (second order, probability targets, tangents of the target)."""
    ignore_index, reduction, label_smoothing = options
    return F.cross_entropy(
        input, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


def _was_kept(grad: torch.Tensor, input: torch.Tensor) -> bool:
    """Whether the forward kept the gradient (else ``grad`` is the empty placeholder)."""
    return grad.numel() == input.numel()


def _is_wrapped(tensor: torch.Tensor) -> bool:
    """Whether a torch.func transform (or gradcheck's older vmap) wraps the tensor."""
    return _functorch.is_functorch_wrapped_tensor(tensor) or _functorch.is_legacy_batchedtensor(tensor)


def _is_plain_cpu_one(grad_output: torch.Tensor) -> bool:
    """Whether the incoming gradient is the 1.0 of ``loss.backward()``, read without a device
    sync: only a plain CPU scalar is looked at (never a CUDA tensor, never under a transform)."""
    return (
        grad_output.device.type == "cpu"
        and grad_output.numel() == 1
        and not _is_wrapped(grad_output)
        and grad_output.item() == 1.0
    )


class _FusedCrossEntropy(torch.autograd.Function):
    """The loss and, when needed, its gradient in one fused call; the backward scales the kept
    gradient. Derivatives the kept gradient cannot give exactly (second order, probability
    targets that require grad) come from PyTorch's own cross-entropy on the saved inputs."""

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing, want_grad):
        return _fused_loss_and_grad(input, target, weight, ignore_index, reduction, label_smoothing, want_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, _ = inputs
        _, grad = output
        ctx.mark_non_differentiable(grad)
        # The kept gradient is an output nobody differentiates: without this, autograd would
        # fill an N x C tensor of zeros as its incoming gradient on every backward.
        ctx.set_materialize_grads(False)
        # Version-checked references, not copies: an in-place change to any of them before the
        # backward raises instead of giving a stale gradient.
        ctx.save_for_backward(input, target, weight, grad)
        ctx.save_for_forward(input, target, weight, grad)
        ctx.options = (ignore_index, reduction, label_smoothing)
        ctx.class_axis = _class_axis(input)

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_kept_gradient):
        input, target, weight, grad = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None:  # the loss itself received no gradient
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled() or need_target or (need_input and not _was_kept(grad, input)):
            # A graph is being built through this backward (double backward, torch.func), or the
            # target needs a gradient: differentiate PyTorch's own loss, exactly.
            probabilities = target.is_floating_point()
            primals = (input, target) if probabilities else (input,)

            def loss_of(*args):
                return _torch_loss(ctx.options, args[0], args[1] if probabilities else target, weight)

            _, vjp = torch.func.vjp(loss_of, *primals)
            grads = vjp(grad_loss)
            grad_input = grads[0] if need_input else None
            grad_target = grads[1] if probabilities and need_target else None
            return grad_input, grad_target, None, None, None, None, None
        if not need_input:
            return None, None, None, None, None, None, None
        if ctx.options[1] == "none":
            grad_input = grad * grad_loss.unsqueeze(ctx.class_axis).to(grad.dtype)
        elif _is_plain_cpu_one(grad_loss):
            # The usual case, loss.backward(): the kept gradient is the answer, no N x C multiply.
            grad_input = grad
        else:
            grad_input = grad * grad_loss.to(grad.dtype)
        return grad_input, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        input, target, weight, grad = ctx.saved_tensors
        _, reduction, label_smoothing = ctx.options
        probabilities = target.is_floating_point()
        out_dtype = torch.promote_types(input.dtype, target.dtype) if probabilities else input.dtype
        wide = torch.promote_types(out_dtype, torch.float32)
        per_row = reduction == "none"
        tangent = None
        if input_tangent is not None:
            if not _was_kept(grad, input):
                # No gradient was kept (a tangent the forward could not see): PyTorch's own.
                # Each row's loss depends on its own row only, so one vjp gives every row's gradient.
                loss, vjp = torch.func.vjp(lambda x: _torch_loss(ctx.options, x, target, weight), input)
                (grad,) = vjp(torch.ones_like(loss))
            # The loss's derivative in the input is ``grad``: contract it with the tangent.
            product = grad.to(wide) * input_tangent.to(wide)
            tangent = product.sum(ctx.class_axis) if per_row else product.sum()
        if target_tangent is not None and probabilities:
            # loss_i = -sum_c w_c ((1 - eps) q_ic + eps / C) log p_ic, linear in the target q.
            log_probs = torch.log_softmax(input.to(wide), ctx.class_axis)
            if weight is not None:
                shape = [1] * input.dim()
                shape[ctx.class_axis] = -1
                log_probs = log_probs * weight.to(wide).view(shape)
            product = -(1.0 - label_smoothing) * log_probs * target_tangent.to(wide)
            part = product.sum(ctx.class_axis) if per_row else product.sum()
            if reduction == "mean":
                part = part / (input.numel() // max(input.shape[ctx.class_axis], 1))
            tangent = part if tangent is None else tangent + part
        if tangent is None:
            tangent = torch.zeros((), dtype=wide, device=input.device)
        return tangent.to(out_dtype), None

    @staticmethod
    def vmap(info, in_dims, input, target, weight, ignore_index, reduction, label_smoothing, want_grad):
        # One fused call per mapped element: each is an independent loss with its own reduction.
        def element(tensor, dim, index):
            return tensor if tensor is None or dim is None else tensor.select(dim, index)

        losses, grads = [], []
        for index in range(info.batch_size):
            loss, grad = _FusedCrossEntropy.apply(
                element(input, in_dims[0], index),
                element(target, in_dims[1], index),
                element(weight, in_dims[2], index),
                ignore_index,
                reduction,
                label_smoothing,
                want_grad,
            )
            losses.append(loss)
            grads.append(grad)
        return (torch.stack(losses), torch.stack(grads)), (0, 0)


def _wants_input_grad(input: torch.Tensor) -> bool:
    """Whether anything can ask for d loss / d input: autograd recording with an input that
    requires grad, a torch.func transform, or a forward-mode dual tensor. When none can, the
    forward-only kernel runs."""
    if _is_wrapped(input):
        return True
    if torch.is_grad_enabled() and input.requires_grad:
        return True
    return forward_ad.unpack_dual(input).tangent is not None


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
    _check_target(input, target, ignore_index)
    if weight is not None and weight.requires_grad:
        # PyTorch's own loss is not differentiable in the class weights either.
        raise InvalidInputError(
            "cross_entropy is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )
    if float(label_smoothing) == 1.0:
        # Allowed by PyTorch (every row's target is uniform), outside the kernel's [0, 1): PyTorch's own.
        return F.cross_entropy(
            input, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=1.0
        )
    loss, _ = _FusedCrossEntropy.apply(
        input, target, weight, int(ignore_index), reduction, float(label_smoothing), _wants_input_grad(input)
    )
    return loss


def _check_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """The target checks PyTorch makes before choosing between index and probability targets."""
    if target.is_floating_point():
        if target.shape != input.shape:
            raise InvalidInputError(
                f"expected target dtype to be Long or Byte, but got {target.dtype} "
                f"(a floating target holds class probabilities and must have the "
                f"input's shape {tuple(input.shape)}; got {tuple(target.shape)})"
            )
        if ignore_index >= 0:
            raise InvalidInputError("ignore_index is not supported for floating point target")
    elif target.shape == input.shape and input.dim() > 0:
        raise InvalidInputError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
    elif target.dtype == torch.bool or target.is_complex():
        raise InvalidInputError(f"expected target dtype to be Long or Byte, but got {target.dtype}")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor, buffers and state dict) whose forward
    runs fastxent's fused kernel."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


# ----------------------------------------------------------------------------------------
# Linear layer + cross-entropy
# ----------------------------------------------------------------------------------------

# Devices whose tensors the fused linear path takes: CPU tensors as NumPy views, CUDA tensors as
# CuPy views (``interop.to_array``) with the launches on PyTorch's stream (``interop.on_stream``).
_LINEAR_DEVICE_TYPES = ("cpu", "cuda")


def _linear_arrays(*tensors):
    """The fused linear path's arrays for tensors on one device (None stays None): NumPy views
    of CPU tensors. The one place that decides which devices the fused path serves."""
    device = tensors[0].device
    if device.type not in _LINEAR_DEVICE_TYPES:
        raise NotImplementedError(
            f"fastxent.torch.linear_cross_entropy takes CPU and CUDA tensors; got tensors on {device}"
        )
    return [None if tensor is None else interop.to_array(tensor) for tensor in tensors]


class _LinearConfig:
    """The static options of one call (hashable, kept on the autograd context)."""

    __slots__ = ("reduction", "ignore_index", "label_smoothing", "softcap", "z_loss")

    def __init__(self, reduction, ignore_index, label_smoothing, softcap, z_loss):
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss


def _mean_over_nothing_counted(target, weight, ignore_index) -> bool:
    """Whether PyTorch's "mean" divides 0 by 0 (no counted row, or counted rows of weight 0)."""
    return target.numel() == 0 or _nothing_counted(target, weight, ignore_index)


def _linear_loss_and_grads(input, linear_weight, linear_bias, target, weight, config, wants, *, row_scale=None):
    """fastxent's fused linear + cross-entropy on the tensors' memory.

    Returns (loss in the input's dtype, grad input, grad linear_weight, grad linear_bias), each
    gradient a tensor sharing the kernel's output or None where ``wants`` (three bools) says no.
    ``row_scale``: a per-row factor folded into the kernel as sample weights, with the sum over
    rows as reduction: the gradients of ``sum_i row_scale_i * loss_i`` (reduction "none"'s
    backward), exact for any factors.
    """
    hidden, w, b, labels = _linear_arrays(input, linear_weight, linear_bias, target)
    reduction = config.reduction
    sample_weight = None
    if row_scale is not None:
        sample_weight = interop.host(row_scale, np.float64).reshape(target.shape)
        reduction = "sum"
    want_hidden, want_weight, want_bias = wants
    try:
        with interop.on_stream(input):
            loss, *grads = linear_cross_entropy_with_grad(
                hidden,
                w,
                labels,
                bias=b,
                ignore_index=config.ignore_index,
                label_smoothing=config.label_smoothing,
                class_weight=interop.host(weight, np.float64),
                sample_weight=sample_weight,
                z_loss=config.z_loss,
                softcap=config.softcap,
                reduction=reduction,
                hidden_grad=want_hidden,
                weight_grad=want_weight,
                bias_grad=want_bias,
            )
    except ValueError as error:
        if "outside the valid range" in str(error):
            raise TargetOutOfBoundsError(str(error)) from None
        raise InvalidInputError(str(error)) from None
    loss = interop.to_tensor(loss if checks.is_cupy_array(loss) else np.asarray(loss)).to(input.dtype)
    # A bfloat16 CUDA tensor reaches the GPU path as a float32 copy where CuPy has no bfloat16:
    # its gradients come back in float32 and go to the tensors' own dtypes here.
    grads = [
        None if g is None else interop.to_tensor(g).to(t.dtype)
        for g, t in zip(grads, (input, linear_weight, linear_bias), strict=True)
    ]
    if reduction == "mean" and _mean_over_nothing_counted(target, weight, config.ignore_index):
        # fastxent's "mean" over nothing is 0 with zero gradients; PyTorch's is 0 / 0: NaN, and
        # NaN gradients wherever a counted row (of class weight 0) reaches them.
        loss = torch.full_like(loss, float("nan"))
        counted = target != config.ignore_index
        if bool(counted.any()):
            grad_input, grad_weight, grad_bias = grads
            if grad_input is not None:
                grads[0] = grad_input.masked_fill(counted.unsqueeze(-1).expand_as(grad_input), float("nan"))
            grads[1] = None if grad_weight is None else torch.full_like(grad_weight, float("nan"))
            grads[2] = None if grad_bias is None else torch.full_like(grad_bias, float("nan"))
    return (loss, *grads)


def _composed_linear_loss(input, linear_weight, linear_bias, target, weight, config):
    """The same loss from PyTorch's own differentiable ops (materialising the logits): the exact
    path for second derivatives, and for ``label_smoothing=1.0`` (outside the kernel's [0, 1))."""
    logits = F.linear(input, linear_weight, linear_bias)
    if config.softcap is not None:
        logits = config.softcap * torch.tanh(logits / config.softcap)
    options = dict(weight=weight, ignore_index=config.ignore_index, label_smoothing=config.label_smoothing)
    if not config.z_loss:
        return F.cross_entropy(logits, target, reduction=config.reduction, **options)
    rows = F.cross_entropy(logits, target, reduction="none", **options)
    counted = target != config.ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    class_weight = torch.ones_like(rows) if weight is None else weight.to(rows.dtype)[safe]
    target_weight = torch.where(counted, class_weight, torch.zeros_like(class_weight))
    # z-loss: z * w_y * logsumexp(logits)^2 per counted row (fastxent's definition).
    rows = rows + config.z_loss * target_weight * torch.logsumexp(logits, dim=-1) ** 2
    if config.reduction == "none":
        return rows
    if config.reduction == "sum":
        return rows.sum()
    return rows.sum() / target_weight.sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and, for "mean" and "sum", the wanted gradients in one fused call; the backward
    scales the kept gradients by the incoming scalar. For "none" the incoming gradient is one
    factor per row, which cannot be applied to a kept weight gradient (dW = G^T X sums over the
    rows): the forward computes the loss alone and the backward computes the gradients with the
    factors folded in as row weights (exact, one fused call each way)."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, target, weight, config, wants):
        if config.reduction == "none":
            wants = (False, False, False)
        loss, *grads = _linear_loss_and_grads(input, linear_weight, linear_bias, target, weight, config, wants)
        # Autograd outputs are tensors: an empty one stands for a gradient not computed.
        return (loss, *(input.new_empty(0) if g is None else g for g in grads))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, linear_weight, linear_bias, target, weight, config, _ = inputs
        _, grad_input, grad_weight, grad_bias = output
        ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias)
        # The kept gradients are outputs nobody differentiates: no zero-filled incoming gradient.
        ctx.set_materialize_grads(False)
        # Version-checked references: an in-place change before the backward raises.
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, grad_input, grad_weight, grad_bias)
        ctx.config = config

    @staticmethod
    def backward(ctx, grad_loss, *_kept):
        input, linear_weight, linear_bias, target, weight, *kept = ctx.saved_tensors
        config = ctx.config
        needs = tuple(ctx.needs_input_grad[:3])
        nothing = (None,) * 7
        if grad_loss is None or not any(needs):
            return nothing
        if torch.is_grad_enabled():
            # A graph is being built through this backward (double backward, gradient penalties,
            # torch.func): differentiate PyTorch's own composition, exactly but unfused.
            saved = (input, linear_weight, linear_bias)
            primals = [t for t, need in zip(saved, needs, strict=True) if need]

            def loss_of(*args):
                given = iter(args)
                x, w, b = (next(given) if need else t for t, need in zip(saved, needs, strict=True))
                return _composed_linear_loss(x, w, b, target, weight, config)

            _, vjp = torch.func.vjp(loss_of, *primals)
            found = iter(vjp(grad_loss))
            grads = tuple(next(found) if need else None for need in needs)
            return (*grads, None, None, None, None)
        if config.reduction == "none":
            _, *grads = _linear_loss_and_grads(
                input, linear_weight, linear_bias, target, weight, config, needs, row_scale=grad_loss
            )
            return (*grads, None, None, None, None)
        if any(need and g.numel() == 0 for need, g in zip(needs, kept, strict=True)):
            # A gradient the forward did not compute (nothing required it then): compute them now.
            _, *kept = _linear_loss_and_grads(input, linear_weight, linear_bias, target, weight, config, needs)
        if _is_plain_cpu_one(grad_loss):
            # loss.backward(): the kept gradients are the answer, no multiply.
            grads = [g if need else None for g, need in zip(kept, needs, strict=True)]
        else:
            grads = [g * grad_loss.to(g.dtype) if need else None for g, need in zip(kept, needs, strict=True)]
        return (*grads, None, None, None, None)


def _records_grad(tensor: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a gradient for ``tensor`` in this call."""
    return tensor is not None and torch.is_grad_enabled() and (tensor.requires_grad or _is_wrapped(tensor))


def _check_linear_inputs(input, linear_weight, target, linear_bias, weight) -> None:
    """PyTorch's checks of F.linear_cross_entropy's arguments, raised as its exception types."""
    tensors = {"input": input, "linear_weight": linear_weight, "target": target}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"linear_cross_entropy(): argument '{name}' must be a Tensor, not {type(value).__name__}")
    for name, value in (("linear_bias", linear_bias), ("weight", weight)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"linear_cross_entropy(): argument '{name}' must be a Tensor or None")
    if input.dim() < 1 or input.dim() > 2:
        raise InvalidInputError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise InvalidInputError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise InvalidInputError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    out_shape = (linear_weight.shape[0], *linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != out_shape:
        raise InvalidInputError(f"expected linear_bias shape {out_shape}, got {tuple(linear_bias.shape)}")
    present = [t for t in (input, linear_weight, linear_bias, target, weight) if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise InvalidInputError(
            f"expected all tensors to be on the same device, got {', '.join(sorted(map(str, devices)))}"
        )
    floats = [t for t in (input, linear_weight, linear_bias) if t is not None]
    if not input.is_floating_point() or input.dtype not in interop.FLOAT_DTYPES:
        raise InvalidInputError(f"expected a float16, bfloat16, float32 or float64 input, got {input.dtype}")
    if any(t.dtype != input.dtype for t in floats):
        raise InvalidInputError(
            "expected input, linear_weight and linear_bias to have the same dtype, got "
            + ", ".join(str(t.dtype) for t in floats)
        )
    if weight is not None:
        if tuple(weight.shape) != (linear_weight.shape[0],):
            raise InvalidInputError(
                f"weight tensor should be defined either for all {linear_weight.shape[0]} classes or no classes "
                f"but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.requires_grad:
            raise InvalidInputError(
                "linear_cross_entropy is not differentiable with respect to argument 'weight'. "
                "This input cannot have requires_grad True."
            )


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13), fused by fastxent.

    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the (N, C)
    logits: one GEMM's work for the loss; with gradients (reductions "mean" and "sum") the
    forward computes the loss and the gradients of every argument that requires one in the same
    call (three GEMMs), and the backward only scales them. A ``linear_weight`` (and
    ``linear_bias``) that does not require grad costs no weight-gradient GEMM. Reduction
    "none" computes the loss alone and its backward the gradients, with the incoming per-row
    gradient folded in as row weights (exact for any incoming gradient).

    Args:
        input: (H,) or (N, H) float16/bfloat16/float32/float64 CPU tensor.
        linear_weight: (C, H), the input's dtype (``nn.Linear``'s weight): logits = input @ W^T.
        target: class indices, () or (N,) integers in [0, C) or ``ignore_index``.
        linear_bias: (C,) of the input's dtype, or None.
        weight: (C,) class weights (not differentiable, as in PyTorch).
        reduction: "none", "mean" (divided by the summed class weights of the counted rows; NaN
            when that is 0, as PyTorch) or "sum".
        ignore_index: a target value that is ignored; None means -100, as in PyTorch.
        label_smoothing: in [0, 1], PyTorch's definition (with class weights too).
        options: PyTorch's ``LinearCrossEntropyOptions`` (chunking); accepted for compatibility
            and ignored: fastxent's path never holds more than a bounded block of logits.
        softcap: fastxent's extra: logits become ``softcap * tanh(logits / softcap)`` (Gemma).
        z_loss: fastxent's extra: adds ``z_loss * w_y * logsumexp(logits)^2`` per counted row.

    Returns:
        The loss in the input's dtype: 0-d, or the target's shape for "none".

    Also as PyTorch: a K-dimensional head (``linear_weight`` (C, d1, ..., H)) and class
    probability targets are handed to PyTorch's own ``F.linear_cross_entropy`` (exact, not
    fused; ``softcap``/``z_loss`` raise ``NotImplementedError`` there), and so is
    ``label_smoothing=1.0`` (through PyTorch's ops). Second derivatives come from PyTorch's own
    ops on the saved inputs (exact, not fused); ``torch.func.vmap`` and forward-mode AD raise.
    CUDA tensors raise ``NotImplementedError`` for now. Errors are PyTorch's types:
    ``TargetOutOfBoundsError`` (``IndexError``), ``InvalidInputError`` (``RuntimeError``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _check_linear_inputs(input, linear_weight, target, linear_bias, weight)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise InvalidInputError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    logits_shape = (*input.shape[:-1], linear_weight.shape[0], *linear_weight.shape[1:-1])
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise InvalidInputError("ignore_index cannot be specified when target contains probabilities")
    if probabilities or linear_weight.dim() > 2:
        if softcap is not None or z_loss:
            raise NotImplementedError(
                "softcap and z_loss apply to class-index targets and (C, H) heads only; "
                "this call has class-probability targets or a K-dimensional head"
            )
        # PyTorch's own, exactly (its reference composition): fastxent's kernel takes neither.
        return F.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
        )
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise InvalidInputError(f"expected target dtype to be Long or Byte, but got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InvalidInputError(
            f"Expected input batch_size ({input.shape[0] if input.dim() == 2 else 1}) to match target shape "
            f"{tuple(target.shape)}: target must be the input's shape without in_features"
        )
    config = _LinearConfig(
        reduction,
        -100 if ignore_index is None else int(ignore_index),
        float(label_smoothing),
        None if softcap is None else float(softcap),
        float(z_loss),
    )
    if config.label_smoothing == 1.0:
        # Allowed by PyTorch (every row's target is uniform), outside the kernel's [0, 1).
        return _composed_linear_loss(input, linear_weight, linear_bias, target, weight, config)
    wants = (_records_grad(input), _records_grad(linear_weight), _records_grad(linear_bias))
    loss, *_ = _FusedLinearCrossEntropy.apply(input, linear_weight, linear_bias, target, weight, config, wants)
    return loss
