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
fastxent's fused linear + cross-entropy; see its docstring.

The kernels are PyTorch custom operators, ``torch.ops.fastxent.cross_entropy`` and
``torch.ops.fastxent.linear_cross_entropy`` (``fastxent._torch_ops``), with fake implementations and
registered autograd: ``torch.compile(..., fullgraph=True)`` and ``torch.export`` take both public
functions without a graph break, and compiled code raises eager code's errors. Tensors under
``torch.func`` transforms or forward-mode AD go through autograd.Functions calling the same
operators (an operator's registered autograd does not reach them).

Tensors are exchanged without copies through DLPack: CPU tensors with NumPy, CUDA tensors with
CuPy (fastxent's GPU backend, on PyTorch's current stream); see ``fastxent._torch_interop``
(bfloat16 CUDA tensors are accepted, through a float32 copy where CuPy has no bfloat16 dtype).
Import this module explicitly:
``import fastxent.torch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from fastxent import _torch_interop as interop
from fastxent import _torch_ops as ops
from fastxent._torch_errors import InvalidInputError, TargetOutOfBoundsError
from fastxent._torch_stats import TokenStats, linear_token_stats, token_stats  # noqa: F401  (re-export)
from fastxent.distributed import _dtensor as dtensor
from fastxent.distributed._torch import vocab_parallel_cross_entropy  # noqa: F401  (re-export)

__all__ = [
    "CrossEntropyLoss",
    "InvalidInputError",
    "TargetOutOfBoundsError",
    "cross_entropy",
    "linear_cross_entropy",
]

# ----------------------------------------------------------------------------------------
# The torch.func path
# ----------------------------------------------------------------------------------------
# The kernels are the custom operators of fastxent._torch_ops, whose registered autograd serves
# plain tensors, torch.compile and torch.export. An operator's autograd does not reach torch.func
# transforms or forward-mode AD, so tensors under those go through autograd.Functions that call
# the same operators and share their autograd formulas, adding jvp and vmap rules.


def _under_transform(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether any tensor is wrapped by a torch.func transform or carries a forward-mode tangent
    (never while torch.compile or torch.export traces: their graphs take the operators)."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    return any(ops.is_wrapped(t) or forward_ad.unpack_dual(t).tangent is not None for t in present)


class _FusedCrossEntropy(torch.autograd.Function):
    """``fastxent::cross_entropy`` with its autograd formula, plus forward-mode AD and vmap:
    the loss and, when needed, its gradient in one fused call; the backward scales the kept
    gradient. Derivatives the kept gradient cannot give exactly (second order, probability
    targets that require grad) come from PyTorch's own cross-entropy on the saved inputs."""

    forward = staticmethod(ops.cross_entropy)
    setup_context = staticmethod(ops.setup_cross_entropy)
    backward = staticmethod(ops.cross_entropy_backward)

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
            if not ctx.kept:
                # No gradient was kept (a tangent the forward could not see): PyTorch's own.
                # Each row's loss depends on its own row only, so one vjp gives every row's gradient.
                loss, vjp = torch.func.vjp(lambda x: ops.torch_loss(ctx.options, x, target, weight), input)
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
    if torch.is_grad_enabled() and input.requires_grad:
        return True
    return _under_transform(input)


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
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("cross_entropy takes tensors for input and target")
    if _checks_now():
        ops.check_reduction(reduction)
        ops.check_target(input, target, ignore_index)
    if weight is not None and weight.requires_grad:
        # PyTorch's own loss is not differentiable in the class weights either.
        raise InvalidInputError(
            "cross_entropy is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )
    if dtensor.any_dtensor(input, target, weight):
        # Sharded tensors: each rank's local part, never a DTensor's storage read as a plain tensor.
        return dtensor.cross_entropy(
            cross_entropy, input, target, weight, int(ignore_index), reduction, label_smoothing
        )
    if float(label_smoothing) == 1.0:
        # Allowed by PyTorch (every row's target is uniform), outside the kernel's [0, 1): PyTorch's own.
        return F.cross_entropy(
            input, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=1.0
        )
    _check_device(input, target, weight)
    args = (input, target, weight, int(ignore_index), reduction, float(label_smoothing), _wants_input_grad(input))
    if _under_transform(input, target):
        loss, _ = _FusedCrossEntropy.apply(*args)
    elif args[-1] and _hands_over_by_ticket(input) and not target.is_floating_point():
        # The gradient goes to the backward by ticket, to be scaled in place (see _torch_kept).
        loss, _ = ops.cross_entropy_kept(*args[:-1])
    else:
        loss, _ = ops.cross_entropy(*args)
    return loss


def _hands_over_by_ticket(input: torch.Tensor) -> bool:
    """Whether the kept gradients go to the backward by ticket (``fastxent._torch_kept``):
    while torch.compile traces (a compiled backward would otherwise copy a saved gradient, and
    could not skip the multiply by 1), and for CUDA tensors (the multiply runs in place and is
    skipped on the device for 1, where reading the incoming gradient would stall the stream).
    Not under torch.export: an exported program keeps the plain operator."""
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting()
    return input.device.type == "cuda"


def _check_device(*tensors: Optional[torch.Tensor]) -> None:
    """TypeError unless every tensor is on a device the kernels serve (CPU or CUDA)."""
    for tensor in tensors:
        if tensor is not None:
            interop.check_tensor(tensor)


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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``fastxent::linear_cross_entropy`` with its autograd formula, as an autograd.Function: the
    path for tensors under a torch.func transform (the operator's own autograd serves plain
    tensors and compiled graphs). Loss and, for "mean" and "sum", the wanted gradients in one
    fused call; the backward scales the kept gradients by the incoming scalar. For "none" the
    incoming gradient is one factor per row, which cannot be applied to a kept weight gradient
    (dW = G^T X sums over the rows): the forward computes the loss alone and the backward computes
    the gradients with the factors folded in as row weights (exact, one fused call each way)."""

    forward = staticmethod(ops.linear_cross_entropy)
    setup_context = staticmethod(ops.setup_linear)
    backward = staticmethod(ops.linear_backward)


def _records_grad(tensor: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a gradient for ``tensor`` in this call."""
    return tensor is not None and torch.is_grad_enabled() and (tensor.requires_grad or _under_transform(tensor))


def _check_linear_arguments(input, linear_weight, target, linear_bias, weight) -> None:
    """The argument types, and that the class weights do not require grad (PyTorch's checks and
    exception types); the shapes, devices and dtypes are ``ops.check_linear_inputs``'s."""
    tensors = {"input": input, "linear_weight": linear_weight, "target": target}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"linear_cross_entropy(): argument '{name}' must be a Tensor, not {type(value).__name__}")
    for name, value in (("linear_bias", linear_bias), ("weight", weight)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"linear_cross_entropy(): argument '{name}' must be a Tensor or None")
    if _checks_now():
        ops.check_linear_inputs(input, linear_weight, target, linear_bias, weight)
    if weight is not None and weight.requires_grad:
        raise InvalidInputError(
            "linear_cross_entropy is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )


def _checks_now() -> bool:
    """Whether the shape, dtype and option checks run here (eager code), or at run time inside
    the operators (code that torch.compile traces: an exception raised while tracing would reach
    the caller as Dynamo's own error, not as the one eager code gets)."""
    return not torch.compiler.is_compiling()


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
    Tensors on other devices than CPU and CUDA raise ``NotImplementedError``. Errors are PyTorch's types:
    ``TargetOutOfBoundsError`` (``IndexError``), ``InvalidInputError`` (``RuntimeError``).
    """
    if _checks_now():
        ops.check_reduction(reduction)
    _check_linear_arguments(input, linear_weight, target, linear_bias, weight)
    if _checks_now():
        ops.check_label_smoothing(label_smoothing)
    if dtensor.any_dtensor(input, linear_weight, target, linear_bias, weight):
        # A tensor-parallel head: vocabulary-parallel over the mesh, gradients keep the placements.
        return dtensor.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=-100 if ignore_index is None else int(ignore_index),
            label_smoothing=float(label_smoothing),
            softcap=None if softcap is None else float(softcap),
            z_loss=float(z_loss),
        )
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
    if _checks_now():
        ops.check_linear_target(input, target)
    config = ops.LinearConfig(
        reduction,
        -100 if ignore_index is None else int(ignore_index),
        float(label_smoothing),
        None if softcap is None else float(softcap),
        float(z_loss),
    )
    if config.label_smoothing == 1.0:
        # Allowed by PyTorch (every row's target is uniform), outside the kernel's [0, 1).
        return ops.composed_linear_loss(input, linear_weight, linear_bias, target, weight, config)
    if input.device.type not in ops.DEVICE_TYPES:
        raise NotImplementedError(
            f"fastxent.torch.linear_cross_entropy takes CPU and CUDA tensors; got tensors on {input.device}"
        )
    # Reduction "none": the forward computes the loss alone (see _FusedLinearCrossEntropy).
    wants = (False,) * 3 if reduction == "none" else tuple(map(_records_grad, (input, linear_weight, linear_bias)))
    args = (input, linear_weight, linear_bias, target, weight, None, *config.as_args(), *wants)
    if _under_transform(input, linear_weight, linear_bias, target):
        loss, *_ = _FusedLinearCrossEntropy.apply(*args)
    elif any(wants) and _hands_over_by_ticket(input):
        # The gradients go to the backward by ticket (see cross_entropy).
        loss, _ = ops.linear_cross_entropy_kept(*args[:5], *args[6:])
    else:
        loss, *_ = ops.linear_cross_entropy(*args)
    return loss
