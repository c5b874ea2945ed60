"""DTensor inputs of ``fastxent.torch.cross_entropy`` and ``linear_cross_entropy``.

A DTensor is a wrapper: its own storage is not the data, so the eager adapter must never read
it as a plain tensor. ``fastxent.torch`` sends every call with a DTensor argument here first,
and this module runs fastxent on each rank's local tensors according to the placements:

- logits ``Shard(0)`` (the batch) with targets ``Shard(0)``: each rank computes the loss of its
  own rows (the eager adapter on its local tensors). "sum" and "mean" add one all-reduction of
  a few float64 numbers: the local sums, the global denominator of "mean" (the summed class
  weights of the counted rows, or the row count for probability targets) and every rank's error
  flags, so every rank raises together. "none" keeps the per-row loss ``Shard(0)`` (the same
  all-reduction of the error flags only). The gradient is ``Shard(0)``.
- logits sharded on the class axis (``Shard(1)`` of (N, C), ``Shard(0)`` of (C,)), targets
  replicated: vocabulary-parallel (``fastxent.distributed._torch``), two all-reductions of O(N)
  statistics; the loss is replicated, the gradient stays sharded on the classes (no rank ever
  holds N x C).
- everything ``Replicate()``: every rank computes the whole loss on its full copy.
- ``linear_cross_entropy`` with the (V, H) weight ``Shard(0)`` (a tensor-parallel head) and the
  hidden states ``Replicate()`` or ``Shard(0)`` (all-gathered first, as sequence parallelism
  does): vocabulary-parallel fused linear + cross-entropy (``fastxent.distributed``); the weight
  and bias gradients stay ``Shard(0)``, the hidden gradient takes the hidden states' placement.

Anything else (``Partial``, a mesh of more than one dimension, sharding on another dimension,
uneven shards other than DTensor's own chunking, targets placed differently from the logits, a
DTensor mixed with plain tensors where that is ambiguous) raises ``InvalidInputError`` naming
the placement. Bad labels raise ``TargetOutOfBoundsError`` on every rank, with the label's
global position.

The eager adapter is handed in as ``local_loss`` (this module does not import
``fastxent.torch``: imports run one way).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from fastxent import _checks as checks
from fastxent import _torch_interop as interop
from fastxent._torch_errors import InvalidInputError, TargetOutOfBoundsError
from fastxent.distributed import linear_cross_entropy_with_grad
from fastxent.distributed._comm import communicator_for
from fastxent.distributed._torch import vocab_parallel_cross_entropy

# Slots of the batch path's all-reduction (SUM, float64): two values, then per rank the error
# kind (0 none, 1 a bad label, 2 another error), the bad label's global flat position, and its
# value as two 32-bit halves (float64 holds each exactly).
_SUM, _DENOMINATOR, _HEAD = 0, 1, 2
_PER_RANK = 4


def _dtensor_class():
    """DTensor, or None while ``torch.distributed.tensor`` is not imported (then no DTensor
    can exist, and importing it here would cost every plain call)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def any_dtensor(*tensors: Any) -> bool:
    """Whether any argument is a DTensor."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _placement_types():
    from torch.distributed.tensor import Replicate, Shard

    return Replicate, Shard


def _describe(tensor: Any) -> str:
    if any_dtensor(tensor):
        return (
            f"a DTensor with placements {tuple(tensor.placements)} on a mesh of shape {tuple(tensor.device_mesh.shape)}"
        )
    return "a plain tensor" if isinstance(tensor, torch.Tensor) else repr(tensor)


def _placement(name: str, tensor: Any, mesh: Any) -> Any:
    """The single placement of a DTensor on ``mesh`` (a 1-D mesh), or an error naming it."""
    if not any_dtensor(tensor):
        raise InvalidInputError(
            f"{name} is {_describe(tensor)} while the other inputs are DTensors: pass {name} as a DTensor "
            "on the same device mesh (a plain tensor's rows cannot be matched to the shards)"
        )
    if tensor.device_mesh != mesh:
        raise InvalidInputError(f"{name} is on device mesh {tensor.device_mesh}, the logits on {mesh}: use one mesh")
    if mesh.ndim != 1:
        raise InvalidInputError(
            f"{name} is {_describe(tensor)}: fastxent takes DTensors on a 1-D device mesh only "
            "(flatten the mesh or redistribute to one dimension first)"
        )
    return tensor.placements[0]


def _is_shard(placement: Any, dim: int, ndim: int) -> bool:
    """Exactly ``Shard(dim)`` (not a strided or other subclass), dims normalised."""
    _, Shard = _placement_types()
    return type(placement) is Shard and placement.dim % max(ndim, 1) == dim % max(ndim, 1)


def _is_replicate(placement: Any) -> bool:
    Replicate, _ = _placement_types()
    return type(placement) is Replicate


def _unsupported(name: str, tensor: Any, what: str) -> InvalidInputError:
    return InvalidInputError(
        f"{name} is {_describe(tensor)}: fastxent supports {what}; redistribute it "
        "(e.g. dtensor.redistribute(mesh, [Replicate()])) or use one of the supported layouts"
    )


def _chunk(mesh: Any, size: int, local_size: int, name: str, tensor: Any) -> int:
    """This rank's offset along a dimension of ``size`` sharded with DTensor's chunking; raises
    if the local size is not what that chunking gives (shards built some other way)."""
    _, Shard = _placement_types()
    rank = mesh.get_local_rank(0)
    expected, offset = Shard.local_shard_size_and_offset(size, mesh.size(0), rank)
    if int(expected) != int(local_size):
        raise InvalidInputError(
            f"{name} is {_describe(tensor)} whose rank {rank} holds {local_size} of {size} entries along the "
            f"sharded dimension, where DTensor's even chunking gives {expected}: uneven shards of another "
            "layout are not supported"
        )
    return int(offset)


def _replicated_local(name: str, tensor: Any, mesh: Any) -> Optional[torch.Tensor]:
    """A tensor every rank holds whole: a plain tensor as is, a ``Replicate()`` DTensor's local
    copy; None stays None."""
    if tensor is None or not any_dtensor(tensor):
        return tensor
    placement = _placement(name, tensor, mesh)
    if not _is_replicate(placement):
        raise _unsupported(name, tensor, "Replicate() here")
    return tensor.to_local()


def _from_local(local: torch.Tensor, mesh: Any, placement: Any, shape: Sequence[int]) -> Any:
    """A DTensor of ``local`` with an explicit global shape (uneven shards included)."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size(shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=shape, stride=stride)


class _Reduced(torch.autograd.Function):
    """The all-reduced ``value``, differentiable as ``scale`` times this rank's ``local`` sum:
    d loss / d local = scale (1, or 1 / the global denominator of "mean"); the incoming gradient
    of a replicated loss is the same on every rank."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad if ctx.scale == 1.0 else grad * ctx.scale), None, None


def _raise_errors(buffer: np.ndarray, world: int, rank: int, error: Optional[Exception], message: Any) -> None:
    """Raise on every rank if any rank flagged an error (the same message where it is a label)."""
    flags = [int(buffer[_HEAD + _PER_RANK * r]) for r in range(world)]
    if not any(flags):
        return
    first = next(r for r in range(world) if flags[r])
    if flags[first] == 1:
        slot = _HEAD + _PER_RANK * first
        value = int(buffer[slot + 2]) * (1 << 32) + int(buffer[slot + 3])
        raise TargetOutOfBoundsError(message(int(buffer[slot + 1]), value))
    if error is not None:
        raise error
    raise InvalidInputError(f"rank {first} rejected its local part of the DTensor call (see the error raised there)")


def _first_bad_label(target: torch.Tensor, num_classes: int, ignore_index: int) -> Optional[Tuple[int, int]]:
    """(flat index, value) of the first label outside [0, C) that is not ignore_index, or None."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    flat = bad.reshape(-1)
    if not bool(flat.any()):
        return None
    index = int(torch.argmax(flat.to(torch.uint8)))
    return index, int(target.reshape(-1)[index])


def _global_position(flat: int, shape: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, tuple(shape))) if len(shape) else ()


def _label_message(shape, num_classes: int, ignore_index: int):
    def message(flat: int, value: int) -> str:
        where = _global_position(flat, shape)
        return (
            f"label {value} at position {where} is outside the valid range [0, {num_classes}) "
            f"and is not ignore_index={ignore_index}"
        )

    return message


# ----------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------


def cross_entropy(
    local_loss: Callable[..., torch.Tensor],
    input: Any,
    target: Any,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Any:
    """``fastxent.torch.cross_entropy`` of DTensors (see the module docstring for the layouts).

    Args:
        local_loss: the eager ``fastxent.torch.cross_entropy`` (run on plain local tensors).
        input: (N, C, d1, ...) or (C,) DTensor logits.
        target: class indices (the input's shape without C) or probabilities (the input's
            shape): a DTensor placed as the layout needs, or (vocabulary-parallel only) a
            plain tensor identical on every rank.
        weight: None, or (C,) class weights: a plain tensor identical on every rank, or a
            DTensor (``Replicate()``, or sharded as the classes are).
        ignore_index, reduction, label_smoothing: as ``fastxent.torch.cross_entropy``, checked.

    Returns:
        A DTensor: the 0-d loss ``Replicate()``, or for "none" the per-row loss placed as the
        targets' rows are.
    """
    if not any_dtensor(input):
        raise InvalidInputError(
            f"input is {_describe(input)} while target or weight is a DTensor: pass the logits as a DTensor"
        )
    mesh = input.device_mesh
    placement = _placement("input", input, mesh)
    class_axis = 0 if input.dim() == 1 else 1
    probabilities = target.is_floating_point()
    lead_shape = tuple(input.shape) if probabilities else tuple(s for i, s in enumerate(input.shape) if i != class_axis)
    if tuple(target.shape) != lead_shape:
        raise InvalidInputError(
            f"labels shape {tuple(target.shape)} must equal the logits shape without the class axis, {lead_shape}"
        )
    if _is_replicate(placement):
        return _replicated(local_loss, input, target, weight, ignore_index, reduction, label_smoothing, mesh)
    if _is_shard(placement, class_axis, input.dim()):
        return _vocab_parallel(input, target, weight, ignore_index, reduction, label_smoothing, mesh, class_axis)
    if input.dim() >= 2 and _is_shard(placement, 0, input.dim()):
        return _batch_sharded(local_loss, input, target, weight, ignore_index, reduction, label_smoothing, mesh)
    raise _unsupported(
        "input",
        input,
        "logits sharded on the batch (Shard(0)), on the classes (Shard(1) of (N, C, ...), Shard(-1) of (N, C)) "
        "or Replicate(), on a 1-D mesh",
    )


def _replicated(local_loss, input, target, weight, ignore_index, reduction, label_smoothing, mesh):
    """Every rank holds everything: the whole loss on each rank's copy, replicated."""
    Replicate, _ = _placement_types()
    local_target = _replicated_local("target", target, mesh)
    local_weight = _replicated_local("weight", weight, mesh)
    loss = local_loss(
        input.to_local(),
        local_target,
        local_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return _from_local(loss, mesh, Replicate(), loss.shape)


def _batch_sharded(local_loss, input, target, weight, ignore_index, reduction, label_smoothing, mesh):
    """Logits Shard(0), targets Shard(0): each rank's rows; one all-reduction of a few numbers."""
    Replicate, Shard = _placement_types()
    if not _is_shard(_placement("target", target, mesh), 0, target.dim()):
        raise _unsupported("target", target, "Shard(0) targets with Shard(0) logits (the same rows on each rank)")
    local_input, local_target = input.to_local(), target.to_local()
    offset = _chunk(mesh, input.shape[0], local_input.shape[0], "input", input)
    _chunk(mesh, target.shape[0], local_target.shape[0], "target", target)
    local_weight = _replicated_local("weight", weight, mesh)
    probabilities = target.is_floating_point()
    num_classes = input.shape[1]
    comm = communicator_for(mesh.get_group(0))
    world, rank = comm.size, comm.rank

    buffer = np.zeros(_HEAD + _PER_RANK * world)
    mine = buffer[_HEAD + _PER_RANK * rank : _HEAD + _PER_RANK * (rank + 1)]
    error, result = None, None
    bad = None if probabilities else _first_bad_label(local_target, num_classes, ignore_index)
    if bad is not None:
        # The label's position in the whole target: rows before this shard come first.
        row_size = int(np.prod(target.shape[1:], dtype=np.int64))
        value = bad[1]
        mine[:] = (1.0, float(offset * row_size + bad[0]), float(value >> 32), float(value & 0xFFFFFFFF))
    else:
        try:
            local_reduction = "none" if reduction == "none" else "sum"
            options = dict(ignore_index=ignore_index, reduction=local_reduction, label_smoothing=label_smoothing)
            result = local_loss(local_input, local_target, local_weight, **options)
            if reduction != "none":
                buffer[_SUM] = float(result.detach().double())
            if reduction == "mean":
                buffer[_DENOMINATOR] = _denominator(local_input, local_target, local_weight, ignore_index)
        except Exception as problem:  # every rank must raise together: flag it, raise after the collective
            error = problem
            mine[0] = 2.0
    comm.allreduce_sum(buffer)
    _raise_errors(buffer, world, rank, error, _label_message(tuple(target.shape), num_classes, ignore_index))

    if reduction == "none":
        # The per-row loss has the input's shape without the class axis (probability targets too).
        rows_shape = tuple(s for i, s in enumerate(input.shape) if i != 1)
        return _from_local(result, mesh, Shard(0), rows_shape)
    total = float(buffer[_SUM])
    if reduction == "sum":
        loss = _Reduced.apply(result, torch.tensor(total, dtype=result.dtype, device=result.device), 1.0)
    elif buffer[_DENOMINATOR] == 0.0:
        # Nothing counted anywhere, so on no rank either: the eager "mean" of each rank's rows
        # gives PyTorch's NaN loss and its NaN gradient on counted rows of weight 0.
        local_options = dict(ignore_index=ignore_index, reduction="mean", label_smoothing=label_smoothing)
        loss = local_loss(local_input, local_target, local_weight, **local_options)
    else:
        # The global sum over the global denominator, in float64, rounded once.
        denominator = float(buffer[_DENOMINATOR])
        value = torch.tensor(total / denominator, dtype=result.dtype, device=result.device)
        loss = _Reduced.apply(result, value, 1.0 / denominator)
    return _from_local(loss, mesh, Replicate(), ())


def _denominator(local_input, local_target, local_weight, ignore_index) -> float:
    """This rank's share of the "mean" denominator: the class weights of its counted rows (the
    row count for probability targets)."""
    if local_target.is_floating_point():
        class_axis = 0 if local_input.dim() == 1 else 1
        return float(local_input.numel() // max(local_input.shape[class_axis], 1))
    counted = local_target != ignore_index
    if local_weight is None:
        return float(counted.sum())
    safe = torch.where(counted, local_target, torch.zeros_like(local_target)).long()
    picked = torch.where(counted, local_weight.double()[safe], torch.zeros((), dtype=torch.float64))
    return float(picked.sum())


def _class_shard(name: str, tensor: Any, mesh: Any, start: int, width: int) -> Optional[torch.Tensor]:
    """This rank's classes [start, start + width) of (C,) class weights: a plain tensor or a
    Replicate() DTensor sliced, a DTensor sharded like the classes taken as it is."""
    if tensor is None:
        return None
    if any_dtensor(tensor):
        placement = _placement(name, tensor, mesh)
        if _is_shard(placement, 0, 1):
            local = tensor.to_local()
            if _chunk(mesh, tensor.shape[0], local.shape[0], name, tensor) != start or local.shape[0] != width:
                raise _unsupported(name, tensor, "class weights sharded as the logits' classes are")
            return local
        if not _is_replicate(placement):
            raise _unsupported(name, tensor, "class weights Replicate() or Shard(0) like the classes")
        tensor = tensor.to_local()
    return tensor[start : start + width]


def _replicated_labels(target: Any, mesh: Any) -> torch.Tensor:
    """Labels every rank holds whole: a Replicate() DTensor's copy, or a plain tensor (checked
    to be identical on every rank by the vocabulary-parallel call's fingerprint)."""
    if any_dtensor(target):
        placement = _placement("target", target, mesh)
        if not _is_replicate(placement):
            raise _unsupported("target", target, "Replicate() targets (or a plain tensor, the same on every rank)")
        return target.to_local()
    return target


def _raise_as_torch(error: ValueError, labels: torch.Tensor, num_classes: int, ignore_index: int):
    """fastxent.distributed's ValueError (raised on every rank together) as the eager adapter's
    types. A bad label gets the eager message, with its position in the whole labels (the
    labels are the same on every rank, so every rank finds the same one)."""
    if "outside the valid range" in str(error):
        bad = _first_bad_label(labels, num_classes, ignore_index)
        if bad is not None:
            raise TargetOutOfBoundsError(_label_message(tuple(labels.shape), num_classes, ignore_index)(*bad)) from None
        raise TargetOutOfBoundsError(str(error)) from None
    raise InvalidInputError(str(error)) from None


def _vocab_parallel(input, target, weight, ignore_index, reduction, label_smoothing, mesh, class_axis):
    """Logits sharded on the classes: the vocabulary-parallel loss; gradient stays sharded."""
    Replicate, _ = _placement_types()
    if target.is_floating_point():
        raise _unsupported(
            "input", input, "class-index targets with logits sharded on the classes (not class probabilities)"
        )
    if float(label_smoothing) == 1.0:
        raise NotImplementedError(
            "label_smoothing=1.0 with logits sharded on the classes is not supported (use a value below 1)"
        )
    labels = _replicated_labels(target, mesh)
    local = input.to_local()
    width = local.shape[class_axis]
    start = _chunk(mesh, input.shape[class_axis], width, "input", input)
    class_weight = _class_shard("weight", weight, mesh, start, width)
    # The sharded kernels take the classes last; a (N, C, d1, ...) input's rows move there.
    rows = local if class_axis == local.dim() - 1 else local.movedim(class_axis, -1)
    try:
        loss = vocab_parallel_cross_entropy(
            rows,
            labels,
            vocab_start=start,
            group=mesh.get_group(0),
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=float(label_smoothing),
            class_weight=class_weight,
        )
    except ValueError as error:
        _raise_as_torch(error, labels, input.shape[class_axis], ignore_index)
    if reduction == "mean" and float(loss.detach()) == 0.0:
        # Every rank holds the same loss, so every rank takes this branch (full_tensor is a collective).
        full_weight = weight.full_tensor() if any_dtensor(weight) else weight
        if _denominator_is_zero(labels, full_weight, ignore_index):
            loss = _NothingCounted.apply(rows, (labels != ignore_index).unsqueeze(-1))
    return _from_local(loss.to(input.dtype), mesh, Replicate(), tuple(loss.shape))


def _denominator_is_zero(labels: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int) -> bool:
    counted = labels != ignore_index
    if weight is None or not bool(counted.any()):
        return not bool(counted.any())
    safe = torch.where(counted, labels, torch.zeros_like(labels)).long()
    return float(torch.where(counted, weight.double()[safe], torch.zeros((), dtype=torch.float64)).sum()) == 0.0


class _NothingCounted(torch.autograd.Function):
    """PyTorch's "mean" over nothing: a NaN loss (0 / 0), whose gradient is NaN on every counted
    row (of class weight 0) and 0 on ignored rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(counted)
        ctx.shape = rows.shape
        dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        return torch.full((), float("nan"), dtype=dtype, device=rows.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (counted,) = ctx.saved_tensors
        zeros = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        return zeros.masked_fill(counted.expand(ctx.shape), float("nan")), None


# ----------------------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------------------


class _VocabParallelLinear(torch.autograd.Function):
    """The vocabulary-parallel linear + cross-entropy on plain local tensors: hidden (N, H) and
    labels (N,) whole on every rank, this rank's weight (V_r, H) and bias rows. For "mean" and
    "sum" the forward computes the loss and the wanted gradients in one call and the backward
    scales them; for "none" the backward computes them with the incoming per-row gradient as
    row weights (identical on every rank: the per-row loss is replicated)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, class_weight, start, config, wants):
        reduction = config[0]
        compute = (False, False, False) if reduction == "none" else wants
        loss, *grads = _linear_call(hidden, weight, bias, labels, class_weight, start, config, reduction, compute)
        ctx.save_for_backward(hidden, weight, bias, labels, class_weight)
        ctx.grads, ctx.start, ctx.config = grads, start, config
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, class_weight = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        nothing = (None,) * 5
        if ctx.config[0] == "none":
            _, *grads = _linear_call(
                hidden, weight, bias, labels, class_weight, ctx.start, ctx.config, "sum", needs, row_scale=grad_loss
            )
            return (*grads, *nothing)
        grads = ctx.grads
        if any(need and g is None for need, g in zip(needs, grads, strict=True)):
            _, *grads = _linear_call(hidden, weight, bias, labels, class_weight, ctx.start, ctx.config, None, needs)
        scaled = [
            None if g is None or not need else g * grad_loss.to(g.dtype) for g, need in zip(grads, needs, strict=True)
        ]
        return (*scaled, *nothing)


def _linear_call(hidden, weight, bias, labels, class_weight, start, config, reduction, wants, *, row_scale=None):
    """fastxent.distributed's linear + cross-entropy on the tensors: (loss, d hidden, d weight,
    d bias) as tensors (None where not wanted). ``row_scale``: per-row factors as sample weights."""
    user_reduction, ignore_index, label_smoothing, softcap, z_loss, group, num_classes = config
    # NumPy views of CPU tensors, CuPy views of CUDA tensors (fastxent.distributed takes both).
    arrays = [interop.to_array(t.detach().contiguous()) if t is not None else None for t in (hidden, weight, bias)]
    sample_weight = None if row_scale is None else interop.host(row_scale, np.float64).reshape(labels.shape)
    want_hidden, want_weight, want_bias = wants
    try:
        loss, *grads = linear_cross_entropy_with_grad(
            arrays[0],
            arrays[1],
            interop.host(labels),
            vocab_start=start,
            group=group,
            bias=arrays[2],
            reduction=reduction or user_reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            class_weight=interop.host(class_weight, np.float64),
            sample_weight=sample_weight,
            z_loss=z_loss,
            softcap=softcap,
            hidden_grad=want_hidden,
            weight_grad=want_weight,
            bias_grad=want_bias,
        )
    except ValueError as error:
        _raise_as_torch(error, labels, num_classes, ignore_index)
    loss = interop.to_tensor(loss if checks.is_cupy_array(loss) else np.asarray(loss)).to(hidden.dtype)
    # A bfloat16 CUDA tensor reaches CuPy as a float32 copy where CuPy has no bfloat16.
    tensors = [
        None if g is None else interop.to_tensor(g).to(t.dtype)
        for g, t in zip(grads, (hidden, weight, bias), strict=True)
    ]
    return (loss, *tensors)


def linear_cross_entropy(
    input: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any,
    weight: Any,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    softcap: Optional[float],
    z_loss: float,
) -> Any:
    """``fastxent.torch.linear_cross_entropy`` of DTensors: a head sharded over the vocabulary.

    Args:
        input: (N, H) or (H,) hidden states, a DTensor ``Replicate()`` or ``Shard(0)`` (rows).
        linear_weight: (V, H) DTensor ``Shard(0)`` (each rank holds rows of the head).
        target: (N,) class indices: a DTensor placed as ``input`` (or, with replicated hidden
            states, a plain tensor identical on every rank).
        linear_bias: None or a (V,) DTensor ``Shard(0)``.
        weight: None or (V,) class weights (plain, ``Replicate()`` or ``Shard(0)``).
        reduction, ignore_index, label_smoothing, softcap, z_loss: checked options.

    Returns:
        A DTensor: the 0-d loss ``Replicate()``, or for "none" the per-row loss placed as the
        hidden states' rows are.
    """
    Replicate, Shard = _placement_types()
    if not any_dtensor(linear_weight):
        raise InvalidInputError(
            f"linear_weight is {_describe(linear_weight)} while another input is a DTensor: fastxent shards "
            "the head over the vocabulary (linear_weight a DTensor Shard(0)); under FSDP2 call the loss "
            "inside the module's forward, where the weight is gathered"
        )
    mesh = linear_weight.device_mesh
    if not _is_shard(_placement("linear_weight", linear_weight, mesh), 0, 2) or linear_weight.dim() != 2:
        raise _unsupported("linear_weight", linear_weight, "a (V, H) head sharded over the vocabulary, Shard(0)")
    if target.is_floating_point():
        raise _unsupported(
            "linear_weight", linear_weight, "class-index targets with a vocabulary-sharded head (not probabilities)"
        )
    if label_smoothing == 1.0:
        raise NotImplementedError(
            "label_smoothing=1.0 with a vocabulary-sharded head is not supported (use a value below 1)"
        )
    local_weight = linear_weight.to_local()
    start = _chunk(mesh, linear_weight.shape[0], local_weight.shape[0], "linear_weight", linear_weight)
    width = local_weight.shape[0]
    local_bias = None
    if linear_bias is not None:
        if not any_dtensor(linear_bias) or not _is_shard(_placement("linear_bias", linear_bias, mesh), 0, 1):
            raise _unsupported("linear_bias", linear_bias, "a bias sharded as the head's rows, Shard(0)")
        local_bias = linear_bias.to_local()
        if local_bias.shape[0] != width:
            raise _unsupported("linear_bias", linear_bias, "a bias sharded as the head's rows, Shard(0)")
    class_weight = _class_shard("weight", weight, mesh, start, width)

    input_placement = _placement("input", input, mesh)
    rows_sharded = input.dim() == 2 and _is_shard(input_placement, 0, 2)
    if rows_sharded:
        # Sequence-parallel style: gather the rows (the hidden gradient goes back as Shard(0)).
        if not any_dtensor(target) or not _is_shard(_placement("target", target, mesh), 0, 1):
            raise _unsupported("target", target, "Shard(0) targets with Shard(0) hidden states")
        _chunk(mesh, input.shape[0], input.to_local().shape[0], "input", input)
        hidden = input.redistribute(mesh, [Replicate()]).to_local()
        labels = target.full_tensor()
    elif _is_replicate(input_placement):
        hidden = input.to_local()
        labels = _replicated_labels(target, mesh)
    else:
        raise _unsupported(
            "input", input, "hidden states Replicate() or Shard(0) (rows) with a vocabulary-sharded head"
        )

    group = mesh.get_group(0)
    config = (reduction, ignore_index, label_smoothing, softcap, z_loss, group, linear_weight.shape[0])
    wants = tuple(
        torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, local_weight, local_bias)
    )
    loss = _VocabParallelLinear.apply(hidden, local_weight, local_bias, labels, class_weight, start, config, wants)
    if reduction == "mean" and float(loss.detach()) == 0.0:
        full_weight = weight.full_tensor() if any_dtensor(weight) else weight
        if _denominator_is_zero(labels, full_weight, ignore_index):
            loss = _LinearNothingCounted.apply(hidden, local_weight, local_bias, labels != ignore_index)
    replicated = _from_local(loss, mesh, Replicate(), tuple(loss.shape))
    if reduction == "none" and rows_sharded:
        return replicated.redistribute(mesh, [Shard(0)])
    return replicated


class _LinearNothingCounted(torch.autograd.Function):
    """PyTorch's "mean" over nothing for the linear loss: NaN, with NaN hidden gradients on the
    counted rows (of class weight 0) and NaN weight and bias gradients when any row is counted."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, counted):
        ctx.save_for_backward(counted)
        ctx.shapes = (hidden.shape, weight.shape, None if bias is None else bias.shape)
        return torch.full((), float("nan"), dtype=hidden.dtype, device=hidden.device)

    @staticmethod
    def backward(ctx, grad):
        (counted,) = ctx.saved_tensors
        hidden_shape, weight_shape, bias_shape = ctx.shapes
        fill = float("nan") if bool(counted.any()) else 0.0
        like = dict(dtype=grad.dtype, device=grad.device)
        grad_hidden = torch.zeros(hidden_shape, **like).masked_fill(
            counted.unsqueeze(-1).expand(hidden_shape), float("nan")
        )
        grad_weight = torch.full(weight_shape, fill, **like)
        grad_bias = None if bias_shape is None else torch.full(bias_shape, fill, **like)
        return grad_hidden, grad_weight, grad_bias, None
