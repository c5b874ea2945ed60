"""Hugging Face transformers: causal-LM training on fastxent's fused linear + cross-entropy.

Three lines::

    import fastxent.transformers
    fastxent.transformers.apply(model)      # or apply(LlamaForCausalLM) before from_pretrained
    trainer.train()                         # or your own loop: loss = model(**batch).loss

While the model is in training mode and gets ``labels``, the patched ``forward`` never builds
the (batch, sequence, vocab) logits: the head's input (the last hidden states, after
``logits_to_keep``) goes with the head's weight and the shifted labels into
``fastxent.torch.linear_cross_entropy``, whose backward returns the hidden states' and the
head's gradients without them either. Everything else is the stock ``forward``'s own code: the
decoder runs exactly as before (the patch calls the stock ``forward`` with ``labels=None`` and
only stands in for the head's ``nn.Linear`` during that call), so every argument, ``**kwargs``,
caches, attention options and hooks keep working.

Kept from transformers' ``ForCausalLMLoss``:
- the labels padded with ``ignore_index`` on the right and shifted by one, or ``shift_labels``
  taken as they are;
- ``ignore_index`` (default -100, or the ``ignore_index`` keyword);
- ``num_items_in_batch`` (gradient accumulation): the sum over tokens divided by it, a tensor
  moved to the loss's device first; without it the mean over counted tokens;
- the config's ``final_logit_softcapping`` (Gemma 2/3): ``cap * tanh(logits / cap)``, fused;
- ``logits_to_keep``: the loss is over the kept positions, as stock;
- a head tied to the input embeddings: the head's weight is the embedding's parameter, so
  autograd adds both gradients to it;
- a frozen head or a PEFT ``ModulesToSaveWrapper`` around it: the active copy's weight is used,
  and a weight that does not require grad gets no dW work.

The stock ``forward`` runs unchanged (real logits, ``ForCausalLMLoss`` when labels are given)
when: no labels, eval mode (so ``generate`` and evaluation see logits), a head on a non-CPU
device or of a dtype other than float32/bfloat16, a head that is not a plain ``nn.Linear`` (LoRA
on the head, quantised layers), or a user-set ``model.loss_function`` other than
:func:`causal_lm_loss`. In the fused path the output's ``logits`` is None (a tuple output keeps
None in its place).

For users who keep their logits, :func:`causal_lm_loss` is ``ForCausalLMLoss`` on fastxent's
cross-entropy kernel: ``model.loss_function = fastxent.transformers.causal_lm_loss``.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fastxent.torch as _fastxent_torch

__all__ = ["FAMILIES", "apply", "apply_to_families", "causal_lm_loss", "is_applied", "remove"]

# The causal-LM classes covered by name and by test. Any other *ForCausalLM whose head is an
# nn.Linear goes through the same generic path, unless its config names a logit transform this
# module does not reproduce (_UNSUPPORTED_CONFIG_KEYS).
FAMILIES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)

# Config entries that change the logits after the head in some model's forward (Cohere's
# logit_scale multiplies, Granite's logits_scaling divides). The fused loss would silently
# differ from stock on those models, so apply() refuses them.
_UNSUPPORTED_CONFIG_KEYS = ("logit_scale", "logits_scaling")

# Attribute on a patched forward function holding the forward it replaced.
_STOCK = "__fastxent_stock_forward__"


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


def _causal_lm_linear_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: Optional[torch.Tensor],
    *,
    shift_labels: Optional[torch.Tensor],
    num_items_in_batch: Any,
    ignore_index: int,
    softcap: Optional[float],
) -> torch.Tensor:
    """ForCausalLMLoss(head(hidden) [softcapped], labels) without the logits.

    Args:
        hidden: (..., H) float32/bfloat16, the head's input (rows in the order the stock forward
            would give the logits' rows, i.e. after logits_to_keep).
        head: the nn.Linear that maps H to V (weight (V, H), optional bias (V,)).
        labels, shift_labels: (..., S) integer; see :func:`_shifted_targets`. Their flattened
            length must equal the number of hidden rows, as for the stock loss.
        num_items_in_batch: None (mean over counted tokens) or an int/float/tensor divisor of
            the summed loss.
        ignore_index: targets equal to it count for nothing.
        softcap: the logits' cap (logits = cap * tanh(z / cap)), or None.

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
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _fused_linear_cross_entropy()(
        rows,
        head.weight,
        targets,
        linear_bias=head.bias,
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


# ----------------------------------------------------------------------------------------
# Standing in for the head during the stock forward
# ----------------------------------------------------------------------------------------


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear (or subclass) that computes exactly F.linear(x, weight, bias): not a
    quantised layer's forward, and no instance-level forward (accelerate's device hooks set
    one; standing in for it would skip them)."""
    return (
        isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and "forward" not in module.__dict__
    )


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


class _HeadStandIn:
    """While active, each of the head's nn.Linear layers computes the fused loss of its input
    (``loss_of(linear, input)``) instead of logits, records it, and returns an empty (..., 0)
    tensor in their place.

    The loss is computed inside the head's own forward because that is where its weight is the
    whole weight: FSDP2 (``fully_shard`` on the head) gathers it in the module's pre-forward hook
    and shards it again after the forward. The empty tensor costs nothing through whatever the
    stock forward does to the logits next (a softcap, a ``.float()``), and no stock loss is
    computed on it because the stock forward runs with ``labels=None``. Hooks on the layers still
    run, so a pre-hook that moves the input to another device is honoured.
    """

    def __init__(self, linears: List[nn.Linear], loss_of: Callable[[nn.Linear, torch.Tensor], torch.Tensor]):
        self.linears = linears
        self.loss_of = loss_of
        self.calls: List[Tuple[nn.Linear, torch.Tensor]] = []

    def _recorder(self, linear: nn.Linear):
        def forward(input: torch.Tensor) -> torch.Tensor:
            # A second call means the stock forward runs for real instead: no loss for it.
            self.calls.append((linear, None if self.calls else self.loss_of(linear, input)))
            return input.new_empty((*input.shape[:-1], 0))

        return forward

    def __enter__(self) -> "_HeadStandIn":
        for linear in self.linears:
            # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up.
            linear.forward = self._recorder(linear)
        return self

    def __exit__(self, *exc: Any) -> None:
        for linear in self.linears:
            del linear.forward


# ----------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------


def _fused_path_applies(model: nn.Module, labels: Any) -> Optional[List[nn.Linear]]:
    """The head's nn.Linear layers when this call can take the fused path, else None."""
    if labels is None or not model.training:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1) for key in _UNSUPPORTED_CONFIG_KEYS):
        # A class-level patch reaches models apply() would have refused.
        return None
    head = model.get_output_embeddings()
    linears = _head_linears(head) if head is not None else None
    if linears is None:
        return None
    for linear in linears:
        if linear.weight.device.type != "cpu" or linear.weight.dtype not in (torch.float32, torch.bfloat16):
            return None
    custom_loss = model.__dict__.get("_loss_function")
    if custom_loss is not None and custom_loss is not causal_lm_loss:
        # The user's own loss needs the logits.
        return None
    return linears


def _without_logits(output: Any, loss: torch.Tensor) -> Any:
    """The stock forward's output (run with labels=None) with the fused loss and no logits."""
    if isinstance(output, tuple):
        # to_tuple() drops None fields: (logits, *rest) without labels, (loss, logits, *rest) with.
        return (loss, None) + tuple(output[1:])
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    return type(output)(loss=loss, logits=None, **fields)


def _make_forward(stock: Callable[..., Any]) -> Callable[..., Any]:
    """The patched forward around ``stock`` (a function taking self first)."""
    signature = inspect.signature(stock)

    @functools.wraps(stock)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        linears = _fused_path_applies(self, labels)
        if linears is None:
            return stock(self, *args, **kwargs)

        extra = {}
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                extra = bound.arguments.get(name, {})
        bound.arguments["labels"] = None

        def loss_of(linear: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
            return _causal_lm_linear_loss(
                hidden,
                linear,
                labels,
                shift_labels=extra.get("shift_labels"),
                num_items_in_batch=extra.get("num_items_in_batch"),
                ignore_index=extra.get("ignore_index", -100),
                softcap=getattr(self.config, "final_logit_softcapping", None),
            )

        stand_in = _HeadStandIn(linears, loss_of)
        with stand_in:
            # Everything the stock forward passes to the decoder (including **kwargs such as
            # num_items_in_batch, which it forwards there too) is passed unchanged.
            output = stock(*bound.args, **bound.kwargs)
        if len(stand_in.calls) > 1:
            # The head ran more than once (e.g. a subclass's own use of it): the placeholders
            # went into the model's output, so run the stock forward for real instead.
            return stock(self, *args, **kwargs)
        if not stand_in.calls:
            # The forward used the head's weight without calling the module: it built the real
            # logits, so the stock loss is computed on them.
            logits = output[0] if isinstance(output, tuple) else output.logits
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **extra)
            if isinstance(output, tuple):
                return (loss,) + tuple(output)
            output["loss"] = loss
            return output
        _, loss = stand_in.calls[0]
        return _without_logits(output, loss)

    setattr(forward, _STOCK, stock)
    return forward


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def _check_patchable(cls: type, config: Any = None) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__name__.endswith("ForCausalLM")):
        raise TypeError(f"fastxent.transformers patches *ForCausalLM models and classes; got {cls!r}")
    if config is not None:
        for key in _UNSUPPORTED_CONFIG_KEYS:
            value = getattr(config, key, None)
            if value is not None and value != 1:
                raise ValueError(
                    f"{cls.__name__}'s config sets {key}={value!r}, a logit transform the fused loss does not "
                    "reproduce; use model.loss_function = fastxent.transformers.causal_lm_loss instead"
                )


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

    Raises:
        TypeError: not a ``*ForCausalLM`` model or class.
        ValueError: the model's config scales the logits after the head (Cohere, Granite).
    """
    if isinstance(target, type):
        _check_patchable(target)
        if not is_applied(target):
            target.forward = _make_forward(target.forward)
        return target
    model = _unwrap(target)
    _check_patchable(type(model), getattr(model, "config", None))
    if model.get_output_embeddings() is None or _head_linears(model.get_output_embeddings()) is None:
        warnings.warn(
            f"{type(model).__name__}'s head is not an nn.Linear; the patched forward will run the stock loss",
            stacklevel=2,
        )
    if not is_applied(model):
        stock = type(model).forward
        stock = getattr(stock, _STOCK, stock)
        # An instance attribute: other models of the class keep the stock forward.
        model.forward = types.MethodType(_make_forward(stock), model)
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
