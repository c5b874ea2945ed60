"""Hugging Face transformers: causal-LM training on fastxent's fused linear + cross-entropy.

Three lines::

    import fastxent.transformers
    fastxent.transformers.apply(model)      # or apply(LlamaForCausalLM) before from_pretrained
    trainer.train()                         # or your own loop: loss = model(**batch).loss

While the model is in training mode and gets ``labels``, the patched ``forward`` never builds
the (batch, sequence, vocab) logits. It runs the stock ``forward`` itself, with every argument
as given, while two things stand in:

- the head's ``nn.Linear`` records its input (the last hidden states, after
  ``logits_to_keep``) and returns a placeholder of the logits' shape that holds no data and
  records what the forward does to it: multiplying or dividing by a scalar (Granite's
  ``logits_scaling``, Cohere's ``logit_scale``, FalconH1's ``lm_head_multiplier``), a
  ``tanh`` softcap under whatever config key (Gemma 2/3, RecurrentGemma), keeping the
  first ``U`` classes (a padded vocabulary), upcasts and device moves;
- ``model.loss_function`` (transformers' ``ForCausalLMLoss``) receives that placeholder and
  computes the same loss with ``fastxent.torch.linear_cross_entropy`` from the recorded hidden
  states, the head's weight and bias, the scale, the cap and the kept classes: no logits, in
  the forward or in the backward.

Whatever the stock forward then adds to the loss (the MoE router's auxiliary loss,
``router_aux_loss_coef * aux_loss`` with its gradient into the router) is added by the stock
code itself, so the loss and every gradient are stock's. Anything else done to the placeholder
(an op the fused loss cannot reproduce, a loss computed without ``loss_function``, a second
call of the head) stops the fused attempt: that call runs the stock forward again, for real,
and a :class:`FallbackWarning` names what was found.

Kept from transformers' ``ForCausalLMLoss``: the labels padded with ``ignore_index`` on the
right and shifted by one, or ``shift_labels`` as given; ``ignore_index``;
``num_items_in_batch`` (the summed loss divided by it, a tensor moved to the loss's device
first); ``logits_to_keep``; a head tied to the input embeddings (autograd adds both gradients
to the shared parameter); a frozen head or a PEFT ``ModulesToSaveWrapper`` around it (the
active copy's weight; a weight that does not require grad gets no dW work).

The stock ``forward`` runs unchanged (real logits, transformers' loss) when: no labels, eval
mode (so ``generate`` and evaluation see logits), a head on a non-CPU device or of a dtype
other than float32/bfloat16, a head that is not a plain ``nn.Linear`` (LoRA on the head,
quantised layers), or a ``model.loss_function`` other than ``ForCausalLMLoss`` or
:func:`causal_lm_loss`. In the fused path the output's ``logits`` is None (a tuple output keeps
None in its place).

For users who keep their logits, :func:`causal_lm_loss` is ``ForCausalLMLoss`` on fastxent's
cross-entropy kernel: ``model.loss_function = fastxent.transformers.causal_lm_loss``.

Under ``torch.compile`` (``fullgraph=True`` included) the patched forward is traced like any
other code and takes the same fused path. The head's layers and the model get their stand-in
forwarders once, by ``apply`` on a model (after ``apply`` on a class, by the first eager
training call): entering and leaving the stand-in then only changes a table keyed by module,
which the compiler traces. A compiled forward that does something the fused loss does not
reproduce runs the stock forward, without the warning (the compiler cannot trace one); until
the forwarders are in place a compiled model runs the stock forward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fastxent.torch as _fastxent_torch

__all__ = ["FAMILIES", "FallbackWarning", "apply", "apply_to_families", "causal_lm_loss", "is_applied", "remove"]

# The causal-LM classes named in the documentation and tested one by one against stock (every
# other *ForCausalLM whose head is an nn.Linear goes through the same path; the tests sweep all
# of them). apply_to_families() patches these.
FAMILIES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
    "CohereForCausalLM",
    "Starcoder2ForCausalLM",
    "StableLmForCausalLM",
)

# Attribute on a patched forward function holding the forward it replaced.
_STOCK = "__fastxent_stock_forward__"


class FallbackWarning(UserWarning):
    """A training call of a patched model ran the stock forward (real logits, transformers' loss)
    because the forward does something to the logits that the fused loss does not reproduce.
    The numbers are stock's; only the memory saving is lost. Make it an error with
    ``warnings.simplefilter("error", fastxent.transformers.FallbackWarning)``."""


class _Unreproducible(Exception):
    """Raised inside the stock forward when it does something to the logits placeholder that the
    fused loss cannot reproduce; the patched forward then runs the stock forward for real."""


# ----------------------------------------------------------------------------------------
# The fused loss
# ----------------------------------------------------------------------------------------


def _fused_linear_cross_entropy() -> Callable[..., torch.Tensor]:
    """``fastxent.torch.linear_cross_entropy`` (the autograd adapter), looked up at each call so
    that tests can wrap it."""
    return _fastxent_torch.linear_cross_entropy


def _shifted_targets(
    labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor], ignore_index: int
) -> torch.Tensor:
    """The flat (N,) int64 targets ``ForCausalLMLoss`` compares the logits' rows with.

    labels (..., S) are padded with ignore_index on the right and shifted left by one (position
    t predicts token t + 1, the last position predicts nothing); shift_labels, when given, are
    already aligned with the logits and are used as they are.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _divide_by_items(loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """loss / num_items_in_batch, a tensor divisor moved to the loss's device first (the Trainer
    counts the items of all accumulated micro-batches, possibly on another device)."""
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


@dataclasses.dataclass(frozen=True)
class _LogitTransform:
    """What the stock forward did to the head's output z (V classes) before its loss, in the
    form the fused loss takes: the loss is on the first ``classes`` columns of

        post * tanh(pre * z)    (capped)          or          pre * z    (not capped)

    with pre = pre_num / pre_den and post = post_num / post_den (numerators and denominators
    kept apart so that Gemma's ``z / cap`` then ``* cap`` folds to exactly 1).
    """

    classes: int
    pre_num: float = 1.0
    pre_den: float = 1.0
    capped: bool = False
    post_num: float = 1.0
    post_den: float = 1.0

    def scaled(self, factor: float, divide: bool) -> "_LogitTransform":
        """This transform followed by multiplying (or dividing) by ``factor``."""
        if divide and factor == 0:
            raise _Unreproducible("divides the logits by zero")
        if self.capped:
            field = "post_den" if divide else "post_num"
        else:
            field = "pre_den" if divide else "pre_num"
        return dataclasses.replace(self, **{field: getattr(self, field) * factor})

    def fused(self) -> Tuple[float, Optional[float]]:
        """(scale, softcap): the loss is on softcap * tanh(scale * z / softcap) (or scale * z
        without a cap). post * tanh(pre * z) = c * tanh(pre * post * z / c) with c = |post|."""
        if not self.capped:
            return self.pre_num / self.pre_den, None
        cap = abs(self.post_num / self.post_den)
        if not 0 < cap < float("inf"):
            raise _Unreproducible(f"caps the logits at {cap!r}")
        return (self.pre_num * self.post_num) / (self.pre_den * self.post_den), cap


def _causal_lm_linear_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: Optional[torch.Tensor],
    *,
    shift_labels: Optional[torch.Tensor],
    num_items_in_batch: Any,
    ignore_index: int,
    transform: Optional[_LogitTransform] = None,
) -> torch.Tensor:
    """ForCausalLMLoss(transform(head(hidden)), labels) without the logits.

    Args:
        hidden: (..., H) float32/bfloat16, the head's input (rows in the order the stock forward
            would give the logits' rows, i.e. after logits_to_keep).
        head: the nn.Linear that maps H to V (weight (V, H), optional bias (V,)).
        labels, shift_labels: (..., S) integer; see :func:`_shifted_targets`. Their flattened
            length must equal the number of hidden rows, as for the stock loss.
        num_items_in_batch: None (mean over counted tokens) or an int/float/tensor divisor of
            the summed loss.
        ignore_index: targets equal to it count for nothing.
        transform: what the forward did to the logits (scale, softcap, kept classes), or None.

    Returns:
        The 0-d float32 loss, differentiable w.r.t. hidden, head.weight and head.bias.
    """
    targets = _shifted_targets(labels, shift_labels, ignore_index).to(hidden.device)
    # Under CPU autocast the hidden states may be bfloat16 while the head is float32 (stock's
    # F.linear would compute in bfloat16): the head's dtype is at least as accurate.
    rows = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    if rows.shape[0] != targets.shape[0]:
        # The error the stock loss raises for this mismatch (through F.cross_entropy).
        raise ValueError(
            f"Expected input batch_size ({rows.shape[0]}) to match target batch_size ({targets.shape[0]})."
        )
    weight, bias = head.weight, head.bias
    scale, softcap = 1.0, None
    if transform is not None:
        scale, softcap = transform.fused()
        if transform.classes < weight.shape[0]:
            # A padded vocabulary: the loss is over the first classes only (views, so autograd
            # puts their gradients into the head's rows and leaves the others at zero, as stock).
            weight = weight[: transform.classes]
            bias = None if bias is None else bias[: transform.classes]
    if scale != 1.0:
        # scale * (x W^T + b) = (scale x) W^T + scale b: the (N, H) rows are scaled, not the
        # (V, H) weight; autograd takes the gradients through the scaling.
        rows = rows * scale
        bias = None if bias is None else bias * scale
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _fused_linear_cross_entropy()(
        rows,
        weight,
        targets,
        linear_bias=bias,
        reduction=reduction,
        ignore_index=ignore_index,
        softcap=softcap,
    )
    # The stock loss is computed on logits.float(): float32 whatever the model's dtype. (A
    # bfloat16 head's loss comes back rounded to bfloat16, as F.linear_cross_entropy returns it;
    # its gradients are computed in float32 and are not affected.)
    loss = loss.float()
    if num_items_in_batch is not None:
        loss = _divide_by_items(loss, num_items_in_batch)
    return loss


def causal_lm_loss(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    vocab_size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` computed by fastxent's fused cross-entropy kernel.

    Same signature and result: the logits upcast to float32, the labels padded and shifted (or
    ``shift_labels``), ``ignore_index``, mean over counted tokens or sum / ``num_items_in_batch``.
    The logits exist (they are its input); the kernel saves the separate log-softmax and
    gradient buffers PyTorch's cross-entropy allocates. Use it with
    ``model.loss_function = fastxent.transformers.causal_lm_loss``.

    Args:
        logits: (..., V) floating point, any device fastxent takes (CPU, or CUDA with CuPy).
        labels: (..., S) integer, unshifted (ignored when shift_labels is given).
        vocab_size: V.
        num_items_in_batch: None, or an int/float/tensor the summed loss is divided by.
        ignore_index: targets equal to it count for nothing.
        shift_labels: (..., S) integer targets already aligned with the logits, or None.
        **kwargs: what the model passes along (attention options and the like); unused.

    Returns:
        The 0-d float32 loss.
    """
    logits = logits.float().reshape(-1, vocab_size)
    targets = _shifted_targets(labels, shift_labels, ignore_index).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _fastxent_torch.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = _divide_by_items(loss, num_items_in_batch)
    return loss


def _is_causal_lm_loss(function: Any) -> bool:
    """Whether ``function`` is transformers' ``ForCausalLMLoss`` or :func:`causal_lm_loss` (the
    losses the fused path computes)."""
    if function is causal_lm_loss:
        return True
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers without the loss module
        return False
    return function is ForCausalLMLoss


# ----------------------------------------------------------------------------------------
# The logits placeholder
# ----------------------------------------------------------------------------------------

# Tensor methods and properties that only read metadata: the placeholder answers them as the
# real logits would (same shape, dtype, device).
_METADATA = frozenset(
    [
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.nelement,
        torch.Tensor.__len__,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
        torch.Tensor.get_device,
        torch.Tensor.element_size,
    ]
    + [
        getattr(torch.Tensor, name).__get__
        for name in ("shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "layout", "requires_grad", "is_sparse")
    ]
)
_MULTIPLY = frozenset([torch.Tensor.mul, torch.mul, torch.multiply, torch.Tensor.multiply, torch.Tensor.__mul__])
_MULTIPLY_REFLECTED = frozenset([torch.Tensor.__rmul__])
_DIVIDE = frozenset([torch.Tensor.div, torch.div, torch.true_divide, torch.divide, torch.Tensor.__truediv__])
_IN_PLACE = {torch.Tensor.mul_: torch.Tensor.mul, torch.Tensor.div_: torch.Tensor.div, torch.Tensor.tanh_: torch.tanh}
_TANH = frozenset([torch.tanh, torch.Tensor.tanh, F.tanh])
_SAME_VALUES = frozenset([torch.Tensor.contiguous, torch.Tensor.clone])


def _op_name(func: Any) -> str:
    if torch.compiler.is_compiling():
        return "an operation"  # torch.compile cannot read a builtin's name while it traces
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return name.replace("TensorBase.", "Tensor.")


def _scalar(value: Any, placeholder: torch.Tensor) -> float:
    """A Python number or a one-element tensor that does not require grad, as a float; anything
    else (a per-class tensor, a learnable scale) cannot be folded into the fused loss."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if torch.is_tensor(value) and not isinstance(value, _Logits) and value.numel() == 1:
        if value.dim() > placeholder.dim():
            raise _Unreproducible(f"broadcasts the logits to {value.dim()} dimensions")
        if value.requires_grad:
            raise _Unreproducible("scales the logits by a tensor that requires grad")
        return float(value.item())
    what = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
    raise _Unreproducible(f"combines the logits with {what}")


def _kept_classes(placeholder: torch.Tensor, index: Any) -> int:
    """The class count after ``placeholder[index]``, which must keep everything but a prefix of
    the class (last) axis: ``logits[..., :U]`` or ``logits[:, :, :U]``."""
    items = index if isinstance(index, tuple) else (index,)
    full = slice(None)
    ellipses = sum(item is Ellipsis for item in items)
    lead, last = items[:-1], items[-1] if items else None
    if not (
        items
        and ellipses <= 1
        and (ellipses == 1 or len(items) == placeholder.dim())
        and all(item is Ellipsis or item == full for item in lead)
        and isinstance(last, slice)
        and last.start in (None, 0)
        and last.step in (None, 1)
        and (last.stop is None or (isinstance(last.stop, int) and last.stop > 0))
    ):
        raise _Unreproducible(f"indexes the logits with {index!r}")
    classes = placeholder.shape[-1]
    return classes if last.stop is None else min(classes, last.stop)


def _cast_dtype(placeholder: torch.Tensor, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.dtype:
    """The dtype of ``placeholder.to(*args, **kwargs)``; only device moves and casts that lose
    nothing (an upcast) are reproduced: the fused loss computes in float32 or better."""
    dtype = placeholder.dtype
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.dtype):
            dtype = value
        elif torch.is_tensor(value):
            raise _Unreproducible("converts the logits to another tensor's type")
    old, new = torch.finfo(placeholder.dtype), torch.finfo(dtype) if dtype.is_floating_point else None
    if new is None or new.eps > old.eps or new.max < old.max:
        raise _Unreproducible(f"casts the logits to {dtype}")
    return dtype


def _placeholders_in(value: Any) -> List["_Logits"]:
    """The :class:`_Logits` placeholders in value (nested in tuples, lists and dicts)."""
    if isinstance(value, _Logits):
        return [value]
    if isinstance(value, (tuple, list)):
        return [p for item in value for p in _placeholders_in(item)]
    if isinstance(value, dict):
        return [p for item in value.values() for p in _placeholders_in(item)]
    return []


class _Logits(torch.Tensor):
    """The stand-in for the head's output: the logits' shape, dtype and device over a single
    element of storage (an expanded 0-d tensor), and the transform the forward applied to the
    head's output so far. Every torch function applied to it is answered here: metadata reads
    as for the real logits, a reproducible transform returns a new placeholder (or updates this
    one in place), anything else raises :class:`_Unreproducible`."""

    _source: int  # index of the head call in _HeadStandIn.calls
    _transform: _LogitTransform
    _stand_in: "_HeadStandIn"

    @staticmethod
    def make(
        stand_in: "_HeadStandIn",
        source: int,
        transform: _LogitTransform,
        shape: Tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        requires_grad: bool,
    ) -> "_Logits":
        base = torch.empty((), dtype=dtype, device=device).requires_grad_(requires_grad)
        placeholder = base.expand(shape).as_subclass(_Logits)
        placeholder._stand_in, placeholder._source, placeholder._transform = stand_in, source, transform
        return placeholder

    def _derived(self, transform: _LogitTransform, dtype: Optional[torch.dtype] = None) -> "_Logits":
        shape = (*self.shape[:-1], transform.classes)
        with torch._C.DisableTorchFunctionSubclass():
            requires_grad = self.requires_grad
        return _Logits.make(
            self._stand_in, self._source, transform, shape, dtype or self.dtype, self.device, requires_grad
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA or func is torch.Tensor.register_hook:
            # A hook changes no value: FSDP2 registers its pre-backward hook on a unit's outputs.
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        placeholders = [arg for arg in args if isinstance(arg, _Logits)]
        try:
            if len(placeholders) != 1 or any(isinstance(v, _Logits) for v in kwargs.values()):
                raise _Unreproducible(f"applies {_op_name(func)} to the logits")
            return cls._apply(func, placeholders[0], args, kwargs)
        except _Unreproducible as error:
            # Recorded as well as raised, in case code between here and the patched forward
            # catches it.
            for placeholder in _placeholders_in((args, kwargs)):
                placeholder._stand_in.unreproducible.append(str(error))
            raise

    @staticmethod
    def _apply(func: Any, placeholder: "_Logits", args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        transform = placeholder._transform
        in_place = func in _IN_PLACE
        op = _IN_PLACE.get(func, func)
        if op in _MULTIPLY or op in _MULTIPLY_REFLECTED or op in _DIVIDE:
            if len(args) != 2 or kwargs:
                raise _Unreproducible(f"applies {_op_name(func)} with {sorted(kwargs) or len(args)} arguments")
            divide = op in _DIVIDE
            if divide and args[0] is not placeholder:
                raise _Unreproducible("divides by the logits")
            other = args[1] if args[0] is placeholder else args[0]
            result = transform.scaled(_scalar(other, placeholder), divide)
        elif op in _TANH:
            if len(args) != 1 or kwargs:
                raise _Unreproducible(f"applies {_op_name(func)} with more arguments")
            if transform.capped:
                raise _Unreproducible("applies tanh to the logits twice")
            result = dataclasses.replace(transform, capped=True)
        elif func is torch.Tensor.__getitem__:
            result = dataclasses.replace(transform, classes=_kept_classes(placeholder, args[1]))
        elif func in (torch.Tensor.float, torch.Tensor.double, torch.Tensor.to):
            if func is torch.Tensor.float:
                target = (torch.float32,)
            elif func is torch.Tensor.double:
                target = (torch.float64,)
            else:
                target = args[1:]
            return placeholder._derived(transform, _cast_dtype(placeholder, target, kwargs))
        elif func in _SAME_VALUES and len(args) == 1:
            result = transform
        else:
            raise _Unreproducible(f"applies {_op_name(func)} to the logits")
        if in_place:
            placeholder._transform = result
            return placeholder
        return placeholder._derived(result)


# ----------------------------------------------------------------------------------------
# Standing in for the head and the loss during the stock forward
# ----------------------------------------------------------------------------------------


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear (or subclass) that computes exactly F.linear(x, weight, bias): not a
    quantised layer's forward, and no instance-level forward (accelerate's device hooks set
    one; standing in for it would skip them)."""
    if not (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        return False
    forward = module.__dict__.get("forward")
    if _is_forwarder(forward, _head_forward):  # the patch's own, over no other forward
        return module.__dict__.get(_PREVIOUS_FORWARD) is None
    return forward is None


def _head_linears(head: nn.Module) -> Optional[List[nn.Linear]]:
    """The nn.Linear layers the head's forward may call with the hidden states, or None when the
    head is something the fused path cannot stand in for.

    A plain nn.Linear is its own. A PEFT ``ModulesToSaveWrapper`` calls one of its copies (the
    original or the active adapter's) and returns its output as is: any of them. A LoRA layer on
    the head adds a low-rank product to the base layer's output and is not supported.
    """
    if _is_plain_linear(head):
        return [head]
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        linears = [m for m in head.modules() if m is not head and not isinstance(m, nn.ModuleDict)]
        if linears and all(_is_plain_linear(m) for m in linears):
            return linears
    return None


def _is_dtensor(tensor: Any) -> bool:
    if type(tensor) in (torch.Tensor, nn.Parameter):  # the usual case, in terms torch.compile traces
        return False
    return any(
        cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed") for cls in type(tensor).__mro__
    )


def _check_whole_weight(linear: nn.Linear) -> None:
    """Refuse a head whose weight is sharded when the loss reads it.

    With the head as its own FSDP2 unit (``fully_shard(model.lm_head)``), FSDP2 gathers the weight
    for the head's forward and shards it again right after, before ``loss_function`` runs: the
    weight is then a sharded DTensor, which the fused loss must not read as the whole weight.
    That call runs the stock forward instead (with a ``FallbackWarning``).
    """
    if _is_dtensor(linear.weight):
        raise _Unreproducible("reads the head's output after FSDP2 sharded the head's weight again")


# The stand-in of each model and head layer in a patched forward now running, by id(). The
# layers and the model get, once, forwarders (below) that consult this table: entering and
# leaving a stand-in then changes no module attribute, which torch.compile can trace. The
# forwarders are methods bound to their module and keep what they replace on the module, so
# that a copy of the model (copy.deepcopy, as a frozen reference policy is made) forwards to
# its own layers.
_ACTIVE: Dict[int, "_HeadStandIn"] = {}
_PREVIOUS_FORWARD = "_fastxent_previous_forward"
_PREVIOUS_LOSS = "_fastxent_previous_loss"


def _head_forward(linear: nn.Linear, *args: Any, **kwargs: Any) -> Any:
    """The head layer's forward while patched: the active stand-in's recorder, else the forward
    it had (an instance attribute another library set, or its class's)."""
    stand_in = _ACTIVE.get(id(linear))
    if stand_in is not None:
        return stand_in.record(linear, *args, **kwargs)
    previous = linear.__dict__.get(_PREVIOUS_FORWARD)
    if previous is not None:
        return previous(*args, **kwargs)
    return type(linear).forward(linear, *args, **kwargs)


def _forward_loss(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's ``_loss_function`` while patched: the active stand-in's loss, else the stock
    loss (``_stock_loss``)."""
    stand_in = _ACTIVE.get(id(model))
    if stand_in is not None:
        return stand_in.loss_function(*args, **kwargs)
    return _stock_loss(model)(*args, **kwargs)


def _is_forwarder(value: Any, function: Callable[..., Any]) -> bool:
    return isinstance(value, types.MethodType) and value.__func__ is function


def _install_forwarders(model: nn.Module, linears: List[nn.Linear]) -> None:
    """Give the model and its head layers their forwarders (once each)."""
    for linear in linears:
        current = linear.__dict__.get("forward")
        if not _is_forwarder(current, _head_forward):
            setattr(linear, _PREVIOUS_FORWARD, current)
            linear.forward = types.MethodType(_head_forward, linear)
    current = model.__dict__.get("_loss_function")
    if not _is_forwarder(current, _forward_loss):
        setattr(model, _PREVIOUS_LOSS, current)
        # transformers' loss_function property returns this instance attribute when it is set.
        model._loss_function = types.MethodType(_forward_loss, model)


def _remove_forwarders(model: nn.Module) -> None:
    """Undo ``_install_forwarders`` on the model and on every layer that has one."""
    for module in model.modules():
        if _is_forwarder(module.__dict__.get("forward"), _head_forward):
            previous = module.__dict__.pop(_PREVIOUS_FORWARD, None)
            del module.forward
            if previous is not None:
                module.forward = previous
    if _is_forwarder(model.__dict__.get("_loss_function"), _forward_loss):
        previous = model.__dict__.pop(_PREVIOUS_LOSS, None)
        del model._loss_function
        if previous is not None:
            model._loss_function = previous


def _stock_loss(model: nn.Module) -> Any:
    """The loss the model's forward would call without the patch: one set on the model, else
    transformers' for its ``loss_type``."""
    loss = getattr(model, "loss_function", None)
    if not _is_forwarder(loss, _forward_loss):
        return loss
    previous = model.__dict__.get(_PREVIOUS_LOSS)
    if previous is not None:
        return previous
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = getattr(model, "loss_type", None)
    return LOSS_MAPPING[loss_type if loss_type in LOSS_MAPPING else "ForCausalLM"]


class _HeadStandIn:
    """While active: each of the head's nn.Linear layers records its input and returns a
    :class:`_Logits` placeholder instead of computing logits, and the model's ``loss_function``
    computes the fused loss when it is given a placeholder.

    Hooks on the layers still run (a pre-hook that moves the input to another device is
    honoured; what a forward hook does to the output is traced like the rest of the forward).
    """

    def __init__(self, model: nn.Module, linears: List[nn.Linear], stock_loss: Callable[..., torch.Tensor]):
        self.model = model
        self.linears = linears
        self.stock_loss = stock_loss
        self.calls: List[Tuple[nn.Linear, torch.Tensor]] = []
        self.fused_losses = 0
        self.unreproducible: List[str] = []

    def record(self, linear: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        """The head layer's call: its input recorded, a placeholder of the logits returned."""
        self.calls.append((linear, input))
        transform = _LogitTransform(classes=linear.out_features)
        dtype = linear.weight.dtype
        if torch.is_autocast_enabled(input.device.type):
            # F.linear under autocast returns the autocast dtype: so does the placeholder.
            dtype = torch.get_autocast_dtype(input.device.type)
        requires_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, linear.weight, linear.bias)
        )
        shape = (*input.shape[:-1], linear.out_features)
        return _Logits.make(self, len(self.calls) - 1, transform, shape, dtype, input.device, requires_grad)

    def loss_function(
        self,
        logits: torch.Tensor,
        labels: Optional[torch.Tensor],
        vocab_size: int,
        num_items_in_batch: Any = None,
        ignore_index: int = -100,
        shift_labels: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``ForCausalLMLoss``'s signature: the fused loss for a placeholder, the stock loss for
        real logits (a forward that used the head's weight without calling the module)."""
        if not isinstance(logits, _Logits):
            return self.stock_loss(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        if vocab_size != logits.shape[-1]:
            raise _Unreproducible(f"computes the loss on rows of {vocab_size} classes, not {logits.shape[-1]}")
        linear, hidden = self.calls[logits._source]
        _check_whole_weight(linear)
        loss = _causal_lm_linear_loss(
            hidden,
            linear,
            labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            transform=logits._transform,
        )
        self.fused_losses += 1
        # A tensor of its own: the forward may add to it in place (loss += aux_loss).
        return loss.clone() if num_items_in_batch is None else loss

    def __enter__(self) -> "_HeadStandIn":
        _install_forwarders(self.model, self.linears)
        for module in (self.model, *self.linears):
            _ACTIVE[id(module)] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in (self.model, *self.linears):
            _ACTIVE.pop(id(module), None)

    def why_not_fused(self) -> Optional[str]:
        """After the stock forward returned: None if its loss is the fused one (or stock's own on
        real logits), else what stopped it."""
        if self.unreproducible:
            return self.unreproducible[0]
        if len(self.calls) > 1:
            return f"calls its head {len(self.calls)} times"
        if self.calls and not self.fused_losses:
            return "does not give the head's output to loss_function"
        return None


# ----------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------


def _fused_path_applies(model: nn.Module, labels: Any) -> Optional[Tuple[List[nn.Linear], Callable[..., Any]]]:
    """(the head's nn.Linear layers, the stock loss function) when this call can take the fused
    path, else None."""
    if labels is None or not model.training:
        return None
    head = model.get_output_embeddings()
    linears = _head_linears(head) if head is not None else None
    if linears is None:
        return None
    for linear in linears:
        if linear.weight.device.type != "cpu" or linear.weight.dtype not in (torch.float32, torch.bfloat16):
            return None
    stock_loss = _stock_loss(model)
    if not _is_causal_lm_loss(stock_loss):
        # A loss of the user's own (or another loss type) needs the logits.
        return None
    return linears, stock_loss


def _compiles_fused(model: nn.Module, linears: List[nn.Linear]) -> bool:
    """Whether a forward torch.compile traces takes the fused path: when the forwarders are in
    place already (``apply`` on a model puts them there; after ``apply`` on a class, the first
    eager training call does), so the traced code changes no module attribute."""
    return _is_forwarder(model.__dict__.get("_loss_function"), _forward_loss) and all(
        _is_forwarder(linear.__dict__.get("forward"), _head_forward) for linear in linears
    )


def _without_logits(output: Any) -> Any:
    """The stock forward's output with None in place of the logits placeholder(s)."""
    if isinstance(output, tuple):
        return tuple(None if isinstance(value, _Logits) else value for value in output)
    fields = {key: None if isinstance(value, _Logits) else value for key, value in output.items()}
    return type(output)(**fields)


def _make_forward(stock: Callable[..., Any]) -> Callable[..., Any]:
    """The patched forward around ``stock`` (a function taking self first)."""
    signature = inspect.signature(stock)

    @functools.wraps(stock)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        labels = signature.bind(self, *args, **kwargs).arguments.get("labels")
        applies = _fused_path_applies(self, labels)
        compiling = torch.compiler.is_compiling()
        if applies is None or (compiling and not _compiles_fused(self, applies[0])):
            return stock(self, *args, **kwargs)
        stand_in = _HeadStandIn(self, *applies)
        # A fallback reruns the forward from the same random state: the same dropout masks as
        # one stock call (eagerly: a compiled graph draws its random numbers its own way).
        rng_state = None if compiling else torch.get_rng_state()
        try:
            with stand_in:
                # Every argument, labels included, goes to the stock forward as given: it runs
                # its decoder, its logit transforms and its loss additions itself.
                output = stock(self, *args, **kwargs)
        except _Unreproducible as error:
            stand_in.unreproducible.append(str(error))
        reason = stand_in.why_not_fused()
        if reason is None:
            return _without_logits(output)
        if compiling:
            # torch.compile cannot trace a warning: the compiled model runs stock's forward
            # without one (an eager call of the same model says why).
            return stock(self, *args, **kwargs)
        warnings.warn(
            f"{type(self).__name__}.forward {reason}, which the fused loss does not reproduce: this call ran the "
            "stock forward (real logits, transformers' loss)",
            FallbackWarning,
            stacklevel=2,
        )
        torch.set_rng_state(rng_state)
        return stock(self, *args, **kwargs)

    setattr(forward, _STOCK, stock)
    return forward


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def _check_patchable(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__name__.endswith("ForCausalLM")):
        raise TypeError(f"fastxent.transformers patches *ForCausalLM models and classes; got {cls!r}")


def _unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT PeftModel (its base model), else the model itself."""
    from transformers import PreTrainedModel

    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and not isinstance(model, PreTrainedModel):
        return get_base_model()
    return model


def is_applied(target: Any) -> bool:
    """Whether ``target`` (a model instance or a class) runs the patched forward."""
    if isinstance(target, type):
        return hasattr(target.__dict__.get("forward"), _STOCK)
    model = _unwrap(target)
    return hasattr(getattr(model.forward, "__func__", model.forward), _STOCK)


def apply(target: Any) -> Any:
    """Patch a causal LM (an instance, or a class for every model built from it afterwards).

    Args:
        target: a ``*ForCausalLM`` model (or a PEFT model around one), or a ``*ForCausalLM``
            class such as ``transformers.LlamaForCausalLM``.

    Returns:
        ``target``, for chaining. Applying twice does nothing more.

    A training call whose forward does something to the logits that the fused loss does not
    reproduce runs the stock forward instead and warns (:class:`FallbackWarning`): what the
    forward does can depend on the call's arguments, so it is checked in each call, on what the
    forward actually did.

    Raises:
        TypeError: not a ``*ForCausalLM`` model or class.
    """
    if isinstance(target, type):
        _check_patchable(target)
        if not is_applied(target):
            target.forward = _make_forward(target.forward)
        return target
    model = _unwrap(target)
    _check_patchable(type(model))
    if model.get_output_embeddings() is None or _head_linears(model.get_output_embeddings()) is None:
        warnings.warn(
            f"{type(model).__name__}'s head is not an nn.Linear; the patched forward will run the stock loss",
            FallbackWarning,
            stacklevel=2,
        )
    if not is_applied(model):
        stock = type(model).forward
        stock = getattr(stock, _STOCK, stock)
        # An instance attribute: other models of the class keep the stock forward.
        model.forward = types.MethodType(_make_forward(stock), model)
    head = model.get_output_embeddings()
    linears = _head_linears(head) if head is not None else None
    if linears:
        # In place before any call, so that torch.compile's first trace finds them.
        _install_forwarders(model, linears)
    return target


def remove(target: Any) -> Any:
    """Undo :func:`apply` on a model instance or a class (nothing happens if it was not applied).

    Returns:
        ``target``.
    """
    if isinstance(target, type):
        forward = target.__dict__.get("forward")
        if hasattr(forward, _STOCK):
            target.forward = getattr(forward, _STOCK)
        return target
    model = _unwrap(target)
    forward = model.__dict__.get("forward")
    if forward is not None and hasattr(getattr(forward, "__func__", None), _STOCK):
        del model.forward
    _remove_forwarders(model)
    return target


def apply_to_families(names: Optional[Tuple[str, ...]] = None) -> List[type]:
    """Patch the classes of :data:`FAMILIES` (or ``names``) that this transformers version has.

    Returns:
        The classes patched.
    """
    import transformers

    patched = []
    for name in names or FAMILIES:
        cls = getattr(transformers, name, None)
        if cls is not None:
            patched.append(apply(cls))
    return patched
