"""fastxent's PyTorch custom operators: the kernels behind ``fastxent.torch``, opaque to
``torch.compile`` and ``torch.export``.

Two operators in the ``fastxent`` namespace, each with a CPU and a CUDA kernel (NumPy views of
CPU tensors, CuPy views of CUDA tensors on PyTorch's current stream: ``fastxent._torch_interop``),
a fake implementation that gives the exact output shapes and dtypes from metadata alone, and an
autograd formula registered on the operator:

    fastxent::cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                            want_grad) -> (loss, grad)
    fastxent::linear_cross_entropy(input, linear_weight, linear_bias, target, weight, row_scale,
                                   reduction, ignore_index, label_smoothing, softcap, z_loss,
                                   input_grad, weight_grad, bias_grad)
                                   -> (loss, grad_input, grad_linear_weight, grad_linear_bias)

Each computes the loss and, where asked, the gradients in one fused call; a gradient not asked
for is an empty tensor. Under ``torch.compile`` (class-index targets; "mean" and "sum" for the
linear head) ``fastxent.torch`` calls a pair instead, which hands the gradients from forward to
backward by ticket (``fastxent._torch_kept``), so that a compiled backward neither copies nor,
for ``loss.backward()``, multiplies them:

    fastxent::cross_entropy_kept(input, target, weight, ignore_index, reduction,
                                 label_smoothing) -> (loss, ticket)
    fastxent::kept_cross_entropy_grad(ticket, input, target, weight, ignore_index, reduction,
                                      label_smoothing, grad_loss) -> grad
    fastxent::linear_cross_entropy_kept(input, linear_weight, linear_bias, target, weight,
                                        reduction, ..., bias_grad) -> (loss, ticket)
    fastxent::kept_linear_cross_entropy_grads(ticket, ..., grad_loss)
                                        -> (grad_input, grad_linear_weight, grad_linear_bias)

The autograd formulas keep those gradients and only scale them by the incoming gradient. Checks that need the data (a label out of range) run inside the kernels, so a
compiled or exported program raises the same errors as eager code; ``fastxent.torch`` makes the
shape and dtype checks before calling an operator.

The operators are the building blocks of ``fastxent.torch.cross_entropy`` and
``linear_cross_entropy``, which validate PyTorch's arguments; call those. Imports torch: only the
torch adapter imports this module.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _functorch

from fastxent import _checks as checks
from fastxent import _torch_interop as interop
from fastxent import _torch_kept as tickets
from fastxent._api import sparse_cross_entropy, sparse_cross_entropy_with_grad
from fastxent._dense_api import categorical_cross_entropy, categorical_cross_entropy_with_grad
from fastxent._linear_api import linear_cross_entropy_with_grad
from fastxent._torch_errors import InvalidInputError, TargetOutOfBoundsError
from fastxent.host_buffers import host_output_like

# The devices the kernels serve; tensors elsewhere (``meta`` included) are refused by
# ``fastxent.torch`` before an operator is called.
DEVICE_TYPES = ("cpu", "cuda")


def _as_torch_error(error: ValueError) -> ValueError:
    """fastxent's ValueError as the exception type PyTorch raises for the same mistake."""
    if "outside the valid range" in str(error):
        return TargetOutOfBoundsError(str(error))
    return InvalidInputError(str(error))


# ----------------------------------------------------------------------------------------
# Argument checks: fastxent.torch runs them before calling an operator in eager code; the
# operators run them again on the real tensors, so a compiled or exported program raises the
# same errors at run time (its fake implementations never raise).
# ----------------------------------------------------------------------------------------

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    """ValueError unless ``reduction`` is one of PyTorch's."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def check_label_smoothing(label_smoothing: float) -> None:
    """PyTorch's range for ``label_smoothing``, [0, 1]."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise InvalidInputError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def check_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
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


def check_linear_inputs(input, linear_weight, target, linear_bias, weight) -> None:
    """PyTorch's checks of F.linear_cross_entropy's shapes, devices and dtypes, raised as its
    exception types."""
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
    if weight is not None and tuple(weight.shape) != (linear_weight.shape[0],):
        raise InvalidInputError(
            f"weight tensor should be defined either for all {linear_weight.shape[0]} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )


def check_linear_target(input: Tensor, target: Tensor) -> None:
    """Class-index targets of the fused linear path: integers of the input's shape without H."""
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise InvalidInputError(f"expected target dtype to be Long or Byte, but got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise InvalidInputError(
            f"Expected input batch_size ({input.shape[0] if input.dim() == 2 else 1}) to match target shape "
            f"{tuple(target.shape)}: target must be the input's shape without in_features"
        )


# ----------------------------------------------------------------------------------------
# Helpers shared by both operators' autograd formulas
# ----------------------------------------------------------------------------------------


def class_axis(input: Tensor) -> int:
    """PyTorch's class dimension: 1 for (N, C, d1, ...), 0 for an unbatched (C,) input."""
    return 0 if input.dim() == 1 else 1


def is_wrapped(tensor: Tensor) -> bool:
    """Whether a torch.func transform (or gradcheck's older vmap) wraps the tensor."""
    return _functorch.is_functorch_wrapped_tensor(tensor) or _functorch.is_legacy_batchedtensor(tensor)


def is_plain_cpu_one(grad_output: Tensor) -> bool:
    """Whether the incoming gradient is the 1.0 of ``loss.backward()``, read without a device
    sync: only a plain CPU tensor holding data is looked at (never a CUDA tensor, a tensor under a
    transform, or the fake tensors of a graph being traced, whose backward must scale)."""
    return (
        type(grad_output) is torch.Tensor
        and grad_output.device.type == "cpu"
        and grad_output.numel() == 1
        and not is_wrapped(grad_output)
        and grad_output.item() == 1.0
    )


def scale_in_place(gradient: Tensor, grad_output: Tensor, class_axis: Optional[int] = None) -> Tensor:
    """``gradient`` times the incoming gradient, written over ``gradient`` (the same multiply,
    and so the same bits, as the out-of-place one); per-row incoming gradients (reduction
    "none") are broadcast along ``class_axis``.

    ``loss.backward()``'s 1 skips the multiply: on the CPU it is looked at here
    (``is_plain_cpu_one``); on CUDA a kernel reads it on the device and skips the pass there, so
    no stream waits for the host."""
    if class_axis is not None:
        gradient.mul_(grad_output.unsqueeze(class_axis).to(gradient.dtype))
    elif gradient.device.type == "cuda" and gradient.is_contiguous():
        _scale_on_device(gradient, grad_output)
    elif not is_plain_cpu_one(grad_output):
        gradient.mul_(grad_output.to(gradient.dtype))
    return gradient


def _scale_on_device(gradient: Tensor, grad_output: Tensor) -> None:
    """``gradient *= grad_output`` on PyTorch's current stream, skipped on the device for 1."""
    from fastxent.gpu.xent import scale_unless_one

    factor = grad_output.detach().reshape(1).to(device=gradient.device, dtype=gradient.dtype)
    with interop.on_stream(gradient):
        view, storage = interop.to_cupy_storage(gradient.reshape(-1))
        factor_view, _ = interop.to_cupy_storage(factor)
        scale_unless_one(view, factor_view, storage or str(view.dtype))


def nothing_counted(target: Tensor, weight: Optional[Tensor], ignore_index: int) -> bool:
    """Whether PyTorch's "mean" divides by zero: no counted row, or counted rows of weight 0."""
    counted = target != ignore_index
    if weight is None:
        return not bool(counted.any())
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return float(torch.where(counted, weight[safe], zero).sum()) == 0.0


def torch_loss(options, input: Tensor, target: Tensor, weight: Optional[Tensor]) -> Tensor:
    """PyTorch's own cross-entropy with the same options: the exact path for derivatives the
    fused kernel does not provide (second order, probability targets, tangents of the target)."""
    ignore_index, reduction, label_smoothing = options
    return F.cross_entropy(
        input, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


# ----------------------------------------------------------------------------------------
# fastxent::cross_entropy
# ----------------------------------------------------------------------------------------


def _loss_shape_and_dtype(input: Tensor, target: Tensor, reduction: str):
    """The loss's shape and dtype (PyTorch's): the target's shape (the input's without the class
    axis for probabilities) for "none", else a scalar; probabilities promote with the target."""
    probabilities = target.is_floating_point()
    if reduction != "none":
        shape = ()
    elif probabilities:
        axis = class_axis(input)
        shape = (*input.shape[:axis], *input.shape[axis + 1 :])
    else:
        shape = tuple(target.shape)
    dtype = torch.promote_types(input.dtype, target.dtype) if probabilities else input.dtype
    return shape, dtype


def fused_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    want_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """fastxent's fused kernel on the tensors' memory: (loss, d loss / d input) when
    ``want_grad``, else (loss, empty placeholder). The function of ``fastxent::cross_entropy``,
    also called by ``fastxent::cross_entropy_kept``.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...), float16/bfloat16/float32/float64.
        target: class indices (the input's shape without C) or probabilities (the input's shape).
        weight: (C,) class weights or None.
        ignore_index, reduction, label_smoothing: PyTorch's options (label_smoothing in [0, 1)).
        want_grad: whether to compute the gradient too.

    Returns:
        The loss (see ``_loss_shape_and_dtype``) and the gradient in the input's dtype and
        shape (empty without ``want_grad``): contiguous, except for probability targets with
        spatial dimensions, whose gradient has the class axis last in memory. PyTorch's conventions: "mean" over
        probability targets divides by the number of rows; a "mean" over nothing is NaN.
    """
    check_reduction(reduction)
    check_target(input, target, ignore_index)
    axis = class_axis(input)
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
                    axis=axis,
                )
            else:
                options = dict(
                    reduction=reduction,
                    ignore_index=ignore_index,
                    label_smoothing=label_smoothing,
                    class_weight=class_weight,
                    axis=axis,
                )
                if want_grad:
                    # A pooled host buffer: already faulted in when a released gradient is reused.
                    out = host_output_like(logits)
                    result = sparse_cross_entropy_with_grad(logits, interop.to_array(target), out=out, **options)
                else:
                    result = sparse_cross_entropy(logits, interop.to_array(target), **options)
    except ValueError as error:
        raise _as_torch_error(error) from None
    loss_array, grad_array = result if want_grad else (result, None)
    _, out_dtype = _loss_shape_and_dtype(input, target, reduction)
    loss = interop.to_tensor(loss_array).to(out_dtype)
    grad = input.new_empty(0) if grad_array is None else interop.to_tensor(grad_array).to(input.dtype)

    # fastxent's "mean" is 0.0 when there is nothing to divide by; PyTorch's is NaN (0 / 0),
    # and its gradient is NaN on every counted row.
    num_rows = target.numel() if not probabilities else input.numel() // max(input.shape[axis], 1)
    if (
        reduction == "mean"
        and float(loss) == 0.0
        and (num_rows == 0 or (not probabilities and nothing_counted(target, weight, ignore_index)))
    ):
        loss = torch.full_like(loss, float("nan"))
        if grad_array is not None and not probabilities:
            counted = (target != ignore_index).unsqueeze(axis).expand_as(grad)
            grad = grad.masked_fill(counted, float("nan"))
    return loss, grad


# The operator runs the plain function above; fastxent::cross_entropy_kept calls it too.
cross_entropy = torch.library.custom_op("fastxent::cross_entropy", mutates_args=(), device_types=DEVICE_TYPES)(
    fused_cross_entropy
)


@cross_entropy.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, want_grad):
    shape, dtype = _loss_shape_and_dtype(input, target, reduction)
    loss = input.new_empty(shape, dtype=dtype)
    if not want_grad:
        return loss, input.new_empty(0)
    axis = class_axis(input)
    if target.is_floating_point() and input.dim() > 2:
        # The probability kernel writes the gradient with the class axis last in memory.
        moved = (*input.shape[:axis], *input.shape[axis + 1 :], input.shape[axis])
        return loss, input.new_empty(moved).movedim(-1, axis)
    return loss, input.new_empty(input.shape)


def setup_cross_entropy(ctx, inputs, output) -> None:
    """Autograd context of ``fastxent::cross_entropy`` (also ``fastxent.torch``'s transform path)."""
    input, target, weight, ignore_index, reduction, label_smoothing, want_grad = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The kept gradient is an output nobody differentiates: without this, autograd would fill an
    # N x C tensor of zeros as its incoming gradient on every backward.
    ctx.set_materialize_grads(False)
    # Version-checked references, not copies: an in-place change to any of them before the
    # backward raises instead of giving a stale gradient.
    ctx.save_for_backward(input, target, weight, grad)
    ctx.save_for_forward(input, target, weight, grad)
    ctx.options = (ignore_index, reduction, label_smoothing)
    ctx.class_axis = class_axis(input)
    ctx.kept = bool(want_grad)


def cross_entropy_backward(ctx, grad_loss, _grad_of_kept_gradient):
    """The kept gradient scaled by the incoming one; second derivatives, gradients of
    probability targets and a gradient the forward did not keep come from PyTorch's own
    cross-entropy on the saved inputs (exact)."""
    input, target, weight, grad = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nothing = (None,) * 7
    if grad_loss is None:  # the loss itself received no gradient
        return nothing
    if torch.is_grad_enabled() or need_target or (need_input and not ctx.kept):
        # A graph is being built through this backward (double backward, torch.func), or the
        # target needs a gradient: differentiate PyTorch's own loss, exactly.
        probabilities = target.is_floating_point()
        primals = (input, target) if probabilities else (input,)

        def loss_of(*args):
            return torch_loss(ctx.options, args[0], args[1] if probabilities else target, weight)

        _, vjp = torch.func.vjp(loss_of, *primals)
        grads = vjp(grad_loss)
        grad_input = grads[0] if need_input else None
        grad_target = grads[1] if probabilities and need_target else None
        return (grad_input, grad_target, *nothing[2:])
    if not need_input:
        return nothing
    if ctx.options[1] == "none":
        grad_input = grad * grad_loss.unsqueeze(ctx.class_axis).to(grad.dtype)
    elif is_plain_cpu_one(grad_loss):
        # The usual case, loss.backward(): the kept gradient is the answer, no N x C multiply.
        grad_input = grad
    else:
        grad_input = grad * grad_loss.to(grad.dtype)
    return (grad_input, *nothing[1:])


cross_entropy.register_autograd(cross_entropy_backward, setup_context=setup_cross_entropy)


# ----------------------------------------------------------------------------------------
# fastxent::cross_entropy_kept and fastxent::kept_cross_entropy_grad: the compiled pair
# ----------------------------------------------------------------------------------------
# Under torch.compile the forward keeps its gradient behind a ticket (fastxent._torch_kept) and
# the backward takes it back, scaled in place: no pass over the (N, C) gradient for
# loss.backward(), no second buffer otherwise.


@torch.library.custom_op("fastxent::cross_entropy_kept", mutates_args=(), device_types=DEVICE_TYPES)
def cross_entropy_kept(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tuple[Tensor, Tensor]:
    """``fastxent::cross_entropy`` with the gradient, for class-index targets, the gradient kept
    behind a ticket instead of returned.

    Returns:
        The loss (as ``fastxent::cross_entropy``'s) and the ticket, a 0-d int64 CPU tensor that
        ``fastxent::kept_cross_entropy_grad`` redeems.
    """
    loss, grad = fused_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, True)
    return loss, tickets.keep((grad,))


@cross_entropy_kept.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing):
    shape, dtype = _loss_shape_and_dtype(input, target, reduction)
    return input.new_empty(shape, dtype=dtype), tickets.ticket_like()


@torch.library.custom_op("fastxent::kept_cross_entropy_grad", mutates_args=(), device_types=DEVICE_TYPES)
def kept_cross_entropy_grad(
    ticket: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    grad_loss: Tensor,
) -> Tensor:
    """d loss / d input times ``grad_loss``: the gradient kept under ``ticket``, scaled in place,
    or, when the ticket was already taken (a second backward), computed again from the inputs.

    Returns:
        A contiguous tensor of the input's shape and dtype.
    """
    found = tickets.take(ticket)
    if found is None:
        _, grad = fused_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, True)
    else:
        (grad,) = found
    per_row_axis = class_axis(input) if reduction == "none" else None
    return scale_in_place(grad, grad_loss, per_row_axis)


@kept_cross_entropy_grad.register_fake
def _(ticket, input, target, weight, ignore_index, reduction, label_smoothing, grad_loss):
    return input.new_empty(input.shape)


def setup_cross_entropy_kept(ctx, inputs, output) -> None:
    """Autograd context of ``fastxent::cross_entropy_kept``: the inputs (for the exact paths and
    a second backward) and the ticket."""
    input, target, weight, ignore_index, reduction, label_smoothing = inputs
    _, ticket = output
    ctx.mark_non_differentiable(ticket)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, target, weight, ticket)
    ctx.options = (ignore_index, reduction, label_smoothing)


def cross_entropy_kept_backward(ctx, grad_loss, _grad_of_ticket):
    """The kept gradient, redeemed and scaled; second derivatives from PyTorch's own loss."""
    input, target, weight, ticket = ctx.saved_tensors
    nothing = (None,) * 6
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return nothing
    if torch.is_grad_enabled():
        # A graph is being built through this backward: differentiate PyTorch's own loss.
        _, vjp = torch.func.vjp(lambda x: torch_loss(ctx.options, x, target, weight), input)
        return (vjp(grad_loss)[0], *nothing[1:])
    return (kept_cross_entropy_grad(ticket, input, target, weight, *ctx.options, grad_loss), *nothing[1:])


cross_entropy_kept.register_autograd(cross_entropy_kept_backward, setup_context=setup_cross_entropy_kept)


# ----------------------------------------------------------------------------------------
# fastxent::linear_cross_entropy
# ----------------------------------------------------------------------------------------


def _linear_arrays(*tensors):
    """The fused linear path's arrays for tensors on one device (None stays None): NumPy views
    of CPU tensors, CuPy views of CUDA tensors."""
    return [None if tensor is None else interop.to_array(tensor) for tensor in tensors]


def mean_over_nothing_counted(target: Tensor, weight: Optional[Tensor], ignore_index: int) -> bool:
    """Whether PyTorch's "mean" divides 0 by 0 (no counted row, or counted rows of weight 0)."""
    return target.numel() == 0 or nothing_counted(target, weight, ignore_index)


def fused_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    row_scale: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
    z_loss: float,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """fastxent's fused linear + cross-entropy on the tensors' memory: the function of
    ``fastxent::linear_cross_entropy``, also called by ``fastxent::linear_cross_entropy_kept``.

    Args:
        input: (H,) or (N, H); linear_weight: (C, H); linear_bias: (C,) or None, all one float dtype.
        target: () or (N,) class indices; weight: (C,) class weights or None.
        row_scale: None, or one factor per row folded into the kernel as sample weights with the
            sum over rows as reduction: the gradients of ``sum_i row_scale_i * loss_i`` (reduction
            "none"'s backward), exact for any factors.
        reduction, ignore_index, label_smoothing: PyTorch's options (label_smoothing in [0, 1)).
        softcap, z_loss: fastxent's extras (see ``fastxent.torch.linear_cross_entropy``).
        input_grad, weight_grad, bias_grad: which gradients to compute.

    Returns:
        (loss in the input's dtype: the target's shape for "none" without ``row_scale``, else a
        scalar; then the gradients of input, linear_weight and linear_bias, each contiguous in
        its tensor's shape and dtype, or empty where not asked for). A "mean" over nothing is NaN.
    """
    check_reduction(reduction)
    check_linear_inputs(input, linear_weight, target, linear_bias, weight)
    check_label_smoothing(label_smoothing)
    check_linear_target(input, target)
    hidden, w, b, labels = _linear_arrays(input, linear_weight, linear_bias, target)
    sample_weight = None
    if row_scale is not None:
        sample_weight = interop.host(row_scale, np.float64).reshape(target.shape)
        reduction = "sum"
    try:
        with interop.on_stream(input):
            loss, *grads = linear_cross_entropy_with_grad(
                hidden,
                w,
                labels,
                bias=b,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                class_weight=interop.host(weight, np.float64),
                sample_weight=sample_weight,
                z_loss=z_loss,
                softcap=softcap,
                reduction=reduction,
                hidden_grad=input_grad,
                weight_grad=weight_grad,
                bias_grad=bias_grad and linear_bias is not None,
            )
    except ValueError as error:
        raise _as_torch_error(error) from None
    loss = interop.to_tensor(loss if checks.is_cupy_array(loss) else np.asarray(loss)).to(input.dtype)
    # A bfloat16 CUDA tensor reaches the GPU path as a float32 copy where CuPy has no bfloat16:
    # its gradients come back in float32 and go to the tensors' own dtypes here.
    grads = [
        None if g is None else interop.to_tensor(g).to(t.dtype)
        for g, t in zip(grads, (input, linear_weight, linear_bias), strict=True)
    ]
    if reduction == "mean" and mean_over_nothing_counted(target, weight, ignore_index):
        # fastxent's "mean" over nothing is 0 with zero gradients; PyTorch's is 0 / 0: NaN, and
        # NaN gradients wherever a counted row (of class weight 0) reaches them.
        loss = torch.full_like(loss, float("nan"))
        counted = target != ignore_index
        if bool(counted.any()):
            grad_input, grad_weight, grad_bias = grads
            if grad_input is not None:
                grads[0] = grad_input.masked_fill(counted.unsqueeze(-1).expand_as(grad_input), float("nan"))
            grads[1] = None if grad_weight is None else torch.full_like(grad_weight, float("nan"))
            grads[2] = None if grad_bias is None else torch.full_like(grad_bias, float("nan"))
    # Operator outputs are tensors: an empty one stands for a gradient not computed.
    return (loss, *(input.new_empty(0) if g is None else g for g in grads))


linear_cross_entropy = torch.library.custom_op(
    "fastxent::linear_cross_entropy", mutates_args=(), device_types=DEVICE_TYPES
)(fused_linear_cross_entropy)


@linear_cross_entropy.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    row_scale,
    reduction,
    ignore_index,
    label_smoothing,
    softcap,
    z_loss,
    input_grad,
    weight_grad,
    bias_grad,
):
    per_row = reduction == "none" and row_scale is None
    loss = input.new_empty(tuple(target.shape) if per_row else ())
    wanted = (input_grad, weight_grad, bias_grad and linear_bias is not None)
    grads = (
        t.new_empty(t.shape) if want else input.new_empty(0)
        for t, want in zip((input, linear_weight, linear_bias), wanted, strict=True)
    )
    return (loss, *grads)


class LinearConfig:
    """The static options of one fused linear call, in ``fastxent::linear_cross_entropy``'s order."""

    __slots__ = ("reduction", "ignore_index", "label_smoothing", "softcap", "z_loss")

    def __init__(self, reduction: str, ignore_index: int, label_smoothing: float, softcap, z_loss: float):
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss

    def as_args(self):
        return (self.reduction, self.ignore_index, self.label_smoothing, self.softcap, self.z_loss)


def composed_linear_loss(input, linear_weight, linear_bias, target, weight, config: LinearConfig) -> Tensor:
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


def setup_linear(ctx, inputs, output) -> None:
    """Autograd context of ``fastxent::linear_cross_entropy`` (also ``fastxent.torch``'s transform path)."""
    input, linear_weight, linear_bias, target, weight, _row_scale, *options = inputs
    config = LinearConfig(*options[:5])
    _, grad_input, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias)
    # The kept gradients are outputs nobody differentiates: no zero-filled incoming gradient.
    ctx.set_materialize_grads(False)
    # Version-checked references: an in-place change before the backward raises.
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, grad_input, grad_weight, grad_bias)
    ctx.config = config
    ctx.kept = tuple(bool(want) for want in options[5:])


def composed_linear_grads(saved, target, weight, config: LinearConfig, needs, grad_loss) -> Tuple:
    """The gradients of (input, linear_weight, linear_bias) in ``saved`` (None where not needed)
    from PyTorch's own composition: differentiable again, for double backward, gradient
    penalties and torch.func, exactly but unfused."""
    primals = [t for t, need in zip(saved, needs, strict=True) if need]

    def loss_of(*args):
        given = iter(args)
        x, w, b = (next(given) if need else t for t, need in zip(saved, needs, strict=True))
        return composed_linear_loss(x, w, b, target, weight, config)

    _, vjp = torch.func.vjp(loss_of, *primals)
    found = iter(vjp(grad_loss))
    return tuple(next(found) if need else None for need in needs)


def fused_linear_grads(saved, target, weight, config: LinearConfig, needs, row_scale) -> list:
    """The needed gradients of (input, linear_weight, linear_bias) from one fused call, with
    ``row_scale`` (or None) as row weights."""
    _, *grads = linear_cross_entropy(*saved, target, weight, row_scale, *config.as_args(), *needs)
    return [g if need else None for g, need in zip(grads, needs, strict=True)]


def linear_backward(ctx, grad_loss, *_kept):
    """The kept gradients scaled by the incoming scalar; for "none" one fused call with the
    incoming per-row gradient as row weights; second derivatives from PyTorch's own ops."""
    input, linear_weight, linear_bias, target, weight, *kept = ctx.saved_tensors
    saved = (input, linear_weight, linear_bias)
    config = ctx.config
    needs = tuple(ctx.needs_input_grad[:3])
    nothing = (None,) * 14
    if grad_loss is None or not any(needs):
        return nothing
    rest = nothing[3:]
    if torch.is_grad_enabled():
        # A graph is being built through this backward: PyTorch's own composition.
        return (*composed_linear_grads(saved, target, weight, config, needs, grad_loss), *rest)
    if config.reduction == "none":
        return (*fused_linear_grads(saved, target, weight, config, needs, grad_loss), *rest)
    if any(need and not was_kept for need, was_kept in zip(needs, ctx.kept, strict=True)):
        # A gradient the forward did not compute (nothing required it then): compute them now.
        kept = fused_linear_grads(saved, target, weight, config, needs, None)
    if is_plain_cpu_one(grad_loss):
        # loss.backward(): the kept gradients are the answer, no multiply.
        grads = [g if need else None for g, need in zip(kept, needs, strict=True)]
    else:
        grads = [g * grad_loss.to(g.dtype) if need else None for g, need in zip(kept, needs, strict=True)]
    return (*grads, *rest)


linear_cross_entropy.register_autograd(linear_backward, setup_context=setup_linear)


# ----------------------------------------------------------------------------------------
# fastxent::linear_cross_entropy_kept and fastxent::kept_linear_cross_entropy_grads
# ----------------------------------------------------------------------------------------
# The compiled pair for "mean" and "sum", as for the cross-entropy above: the gradients of the
# hidden states, the head's weight and its bias go to the backward by ticket.


@torch.library.custom_op("fastxent::linear_cross_entropy_kept", mutates_args=(), device_types=DEVICE_TYPES)
def linear_cross_entropy_kept(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
    z_loss: float,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """``fastxent::linear_cross_entropy`` for "mean" or "sum" with the wanted gradients kept
    behind a ticket.

    Returns:
        The scalar loss in the input's dtype and the ticket (a 0-d int64 CPU tensor) that
        ``fastxent::kept_linear_cross_entropy_grads`` redeems.
    """
    loss, *grads = fused_linear_cross_entropy(
        input, linear_weight, linear_bias, target, weight, None, reduction, ignore_index, label_smoothing,
        softcap, z_loss, input_grad, weight_grad, bias_grad,
    )  # fmt: skip
    return loss, tickets.keep(grads)


@linear_cross_entropy_kept.register_fake
def _(input, linear_weight, linear_bias, target, weight, *_options):
    return input.new_empty(()), tickets.ticket_like()


@torch.library.custom_op("fastxent::kept_linear_cross_entropy_grads", mutates_args=(), device_types=DEVICE_TYPES)
def kept_linear_cross_entropy_grads(
    ticket: Tensor,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
    z_loss: float,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    grad_loss: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients kept under ``ticket`` times the scalar ``grad_loss``, scaled in place, or
    computed again when the ticket was already taken.

    Returns:
        The gradients of input, linear_weight and linear_bias as ``fastxent::linear_cross_entropy``
        gives them (empty where not asked for).
    """
    found = tickets.take(ticket)
    if found is None:
        _, *found = fused_linear_cross_entropy(
            input, linear_weight, linear_bias, target, weight, None, reduction, ignore_index, label_smoothing,
            softcap, z_loss, input_grad, weight_grad, bias_grad,
        )  # fmt: skip
    return tuple(scale_in_place(g, grad_loss) if g.numel() else g for g in found)


@kept_linear_cross_entropy_grads.register_fake
def _(ticket, input, linear_weight, linear_bias, target, weight, *options_and_grad_loss):
    input_grad, weight_grad, bias_grad = options_and_grad_loss[5:8]
    wanted = (input_grad, weight_grad, bias_grad and linear_bias is not None)
    return tuple(
        t.new_empty(t.shape) if want else input.new_empty(0)
        for t, want in zip((input, linear_weight, linear_bias), wanted, strict=True)
    )


def setup_linear_kept(ctx, inputs, output) -> None:
    """Autograd context of ``fastxent::linear_cross_entropy_kept``."""
    input, linear_weight, linear_bias, target, weight, *options = inputs
    _, ticket = output
    ctx.mark_non_differentiable(ticket)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, ticket)
    ctx.config = LinearConfig(*options[:5])
    ctx.kept = tuple(bool(want) for want in options[5:])


def linear_kept_backward(ctx, grad_loss, _grad_of_ticket):
    """The kept gradients, redeemed and scaled; PyTorch's own composition where a graph is built
    through the backward, and one fused call for a gradient the forward did not keep."""
    input, linear_weight, linear_bias, target, weight, ticket = ctx.saved_tensors
    config = ctx.config
    needs = tuple(ctx.needs_input_grad[:3])
    nothing = (None,) * 13
    if grad_loss is None or not any(needs):
        return nothing
    saved = (input, linear_weight, linear_bias)
    if torch.is_grad_enabled():
        grads = composed_linear_grads(saved, target, weight, config, needs, grad_loss)
    elif any(need and not was_kept for need, was_kept in zip(needs, ctx.kept, strict=True)):
        # A gradient the forward did not compute: all of them now, from one fused call.
        fresh = fused_linear_grads(saved, target, weight, config, needs, None)
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in fresh]
    else:
        args = (input, linear_weight, linear_bias, target, weight, *config.as_args(), *ctx.kept)
        grads = kept_linear_cross_entropy_grads(ticket, *args, grad_loss)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *nothing[3:])


linear_cross_entropy_kept.register_autograd(linear_kept_backward, setup_context=setup_linear_kept)
