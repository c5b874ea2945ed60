"""PyTorch adapter of the per-token statistics: ``token_stats`` and ``linear_token_stats``,
re-exported by ``fastxent.torch``.

Each is a ``torch.library`` custom operator (``fastxent::token_stats``,
``fastxent::linear_token_stats`` and their backwards) with a fake implementation, so it runs
under ``torch.compile`` and ``torch.export``, and an autograd formula: logprob, entropy and lse
are differentiable jointly, the backward of any a logprob + b entropy + c lse being one sweep
(the fused linear one recomputes the logits block by block instead of keeping them). argmax is
an integer output without gradient. Second derivatives are not implemented (the backward
operators have no autograd formula of their own: asking for one raises).

Tensors reach the kernels without copies (``fastxent._torch_interop``): CPU tensors as NumPy,
CUDA tensors as CuPy.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fastxent import _torch_interop as interop
from fastxent._linear_api import linear_token_stats_backward, linear_token_stats_forward
from fastxent._token_range import TokenRowStats
from fastxent._token_stats_api import TokenForward, token_stats_backward, token_stats_forward
from fastxent.host_buffers import host_output_like

__all__ = ["TokenStats", "linear_token_stats", "token_stats"]


class TokenStats(NamedTuple):
    """Per-token statistics as tensors, each with the target's shape: logprob, entropy, lse
    (float32, float64 for float64 input) and argmax (int64); see ``fastxent.token_stats``."""

    logprob: Tensor
    entropy: Tensor
    lse: Tensor
    argmax: Tensor


def _value_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _encoded(labels, ignore_index: int):
    """The kernels' labels (-1 for ignored rows) of labels the forward already checked."""
    xp = np if isinstance(labels, np.ndarray) else interop.cupy_module()
    return xp.where(labels == ignore_index, -1, labels).astype(xp.int64)


def _saved_stats(stats: TokenRowStats) -> Tensor:
    """(3, N) float64: the row max, sum of exps and entropy accumulator the backward needs."""
    xp = np if isinstance(stats.row_max, np.ndarray) else interop.cupy_module()
    return interop.to_tensor(xp.stack([stats.row_max, stats.sum_exp, stats.centred_sum]))


def _forward_of(saved: Tensor, labels, ignore_index: int, temperature: float, softcap: Optional[float]):
    """A ``TokenForward`` for the backward from the saved (3, N) statistics."""
    row_max, sum_exp, centred_sum = interop.to_array(saved)
    stats = TokenRowStats(row_max, sum_exp, centred_sum, None, None, None)
    return TokenForward(None, stats, _encoded(labels, ignore_index), 1, temperature, softcap)


def _grad_array(grad: Optional[Tensor]):
    return None if grad is None else interop.to_array(grad.to(torch.float64).contiguous())


def _tensor(array) -> Tensor:
    return interop.to_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array)


# ----------------------------------------------------------------------------------------
# From logits
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastxent::token_stats", mutates_args=())
def _token_stats_op(
    logits: Tensor, labels: Tensor, temperature: float, softcap: Optional[float], ignore_index: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logprob, entropy, lse, argmax, saved statistics (3, N) float64) of logits (N, C)."""
    with interop.on_stream(logits):
        forward = token_stats_forward(
            interop.to_array(logits),
            interop.to_array(labels),
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
        )
    values = [_tensor(v) for v in forward.values]
    return (*values, _saved_stats(forward.stats))


def _stats_outputs_like(like: Tensor):
    """Empty outputs of a token-statistics operator for the rows of ``like`` (N, ...): logprob,
    entropy and lse in the value dtype, argmax int64, and the float64 (3, N) saved statistics."""
    num_rows = like.shape[0]
    values = [like.new_empty((num_rows,), dtype=_value_dtype(like.dtype)) for _ in range(3)]
    return (
        *values,
        like.new_empty((num_rows,), dtype=torch.int64),
        like.new_empty((3, num_rows), dtype=torch.float64),
    )


@_token_stats_op.register_fake
def _token_stats_fake(logits, labels, temperature, softcap, ignore_index):
    return _stats_outputs_like(logits)


@torch.library.custom_op("fastxent::token_stats_backward", mutates_args=())
def _token_stats_backward_op(
    logits: Tensor,
    labels: Tensor,
    saved: Tensor,
    grad_logprob: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    grad_lse: Optional[Tensor],
    temperature: float,
    softcap: Optional[float],
    ignore_index: int,
) -> Tensor:
    """The gradient w.r.t. logits (N, C) of sum(a logprob + b entropy + c lse)."""
    with interop.on_stream(logits):
        forward = _forward_of(saved, interop.to_array(labels), ignore_index, temperature, softcap)
        rows = interop.to_array(logits)
        grad = token_stats_backward(
            rows,
            forward,
            _grad_array(grad_logprob),
            _grad_array(grad_entropy),
            _grad_array(grad_lse),
            # A pooled host buffer: already faulted in when a released gradient is reused.
            out=host_output_like(rows),
        )
    return _tensor(grad).to(logits.dtype)


@_token_stats_backward_op.register_fake
def _token_stats_backward_fake(
    logits, labels, saved, grad_logprob, grad_entropy, grad_lse, temperature, softcap, ignore_index
):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, softcap, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[4])
    ctx.options = (temperature, softcap, ignore_index)


def _backward(ctx, grad_logprob, grad_entropy, grad_lse, _grad_argmax, _grad_saved):
    logits, labels, saved = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _token_stats_backward_op(logits, labels, saved, grad_logprob, grad_entropy, grad_lse, *ctx.options)
    return grad, None, None, None, None


_token_stats_op.register_autograd(_backward, setup_context=_setup_context)


def _check(input: Tensor, target: Tensor) -> None:
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be tensors")
    interop.check_tensor(input)
    if input.dtype not in interop.FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64; got {input.dtype}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold class indices (an integer tensor); got {target.dtype}")


def token_stats(
    input: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    dim: int = -1,
) -> TokenStats:
    """Per-token log-probability, entropy, logsumexp and argmax of logits, in one sweep.

    ``fastxent.token_stats`` on tensors: with z = softcap(input) / temperature,
    logprob = log_softmax(z)[target], entropy = -sum softmax(z) log_softmax(z), lse =
    logsumexp(z), argmax = the index of the largest logit (lowest on ties).

    Args:
        input: (..., C, ...) float16/bfloat16/float32/float64 logits, the classes on ``dim``
            (last by default, as an LM head's (B, T, V)); CPU or CUDA.
        target: integer class indices, the input's shape without ``dim``.
        temperature, softcap: as ``fastxent.token_stats``.
        ignore_index: rows with this target get logprob 0 and entropy 0 and pass no gradient
            through them (-100 as ``F.cross_entropy``).
        dim: the class dimension.

    Returns:
        ``TokenStats(logprob, entropy, lse, argmax)`` of the target's shape; logprob, entropy
        and lse are differentiable (jointly: one backward sweep), argmax is int64.
    """
    _check(input, target)
    dim = dim % input.dim() if input.dim() else dim
    moved = input.movedim(dim, -1) if input.dim() else input
    lead_shape = moved.shape[:-1]
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the input's shape without dim {dim}, {tuple(lead_shape)}"
        )
    rows = moved.reshape(-1, moved.shape[-1]).contiguous()
    logprob, entropy, lse, argmax, _ = _token_stats_op(
        rows,
        target.reshape(-1).contiguous(),
        float(temperature),
        None if softcap is None else float(softcap),
        int(ignore_index),
    )
    return TokenStats(*(t.reshape(lead_shape) for t in (logprob, entropy, lse, argmax)))


# ----------------------------------------------------------------------------------------
# From hidden states and the head's weight
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("fastxent::linear_token_stats", mutates_args=())
def _linear_token_stats_op(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    temperature: float,
    softcap: Optional[float],
    ignore_index: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logprob, entropy, lse, argmax, saved statistics (3, N)) of input (N, H) @ weight.T + bias."""
    hidden, w, b, y = (None if t is None else interop.to_array(t) for t in (input, weight, bias, labels))
    with interop.on_stream(input):
        forward = linear_token_stats_forward(
            hidden, w, y, bias=b, temperature=temperature, softcap=softcap, ignore_index=ignore_index
        )
    values = [_tensor(v) for v in forward.values]
    return (*values, _saved_stats(forward.stats))


@_linear_token_stats_op.register_fake
def _linear_token_stats_fake(input, weight, bias, labels, temperature, softcap, ignore_index):
    return _stats_outputs_like(input)


@torch.library.custom_op("fastxent::linear_token_stats_backward", mutates_args=())
def _linear_token_stats_backward_op(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    saved: Tensor,
    grad_logprob: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    grad_lse: Optional[Tensor],
    temperature: float,
    softcap: Optional[float],
    ignore_index: int,
    wants: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. input, weight and bias (empty where not wanted)."""
    hidden, w, b = (None if t is None else interop.to_array(t) for t in (input, weight, bias))
    with interop.on_stream(input):
        forward = _forward_of(saved, interop.to_array(labels), ignore_index, temperature, softcap)
        grads = linear_token_stats_backward(
            hidden,
            w,
            forward,
            _grad_array(grad_logprob),
            _grad_array(grad_entropy),
            _grad_array(grad_lse),
            bias=b,
            want_hidden=wants[0],
            want_weight=wants[1],
            want_bias=wants[2] and bias is not None,
        )
    out = []
    for grad, like in zip(grads, (input, weight, bias), strict=True):
        out.append(input.new_empty((0,)) if grad is None else _tensor(grad).to(like.dtype))
    return tuple(out)


@_linear_token_stats_backward_op.register_fake
def _linear_token_stats_backward_fake(
    input, weight, bias, labels, saved, grad_logprob, grad_entropy, grad_lse, temperature, softcap, ignore_index, wants
):
    shapes = (input, weight, bias)
    return tuple(
        input.new_empty((0,)) if not want or like is None else torch.empty_like(like)
        for want, like in zip(wants, shapes, strict=True)
    )


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias, labels, temperature, softcap, ignore_index = inputs
    ctx.save_for_backward(input, weight, bias, labels, output[4])
    ctx.options = (temperature, softcap, ignore_index)


def _linear_backward(ctx, grad_logprob, grad_entropy, grad_lse, _grad_argmax, _grad_saved):
    input, weight, bias, labels, saved = ctx.saved_tensors
    wants = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if not any(wants):
        return None, None, None, None, None, None, None
    grads = _linear_token_stats_backward_op(
        input, weight, bias, labels, saved, grad_logprob, grad_entropy, grad_lse, *ctx.options, wants
    )
    grads = [g if want else None for g, want in zip(grads, wants, strict=True)]
    return (*grads, None, None, None, None)


_linear_token_stats_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_token_stats(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> TokenStats:
    """``token_stats`` of the logits ``input @ linear_weight.T + linear_bias`` without building
    them (``F.linear_cross_entropy``'s argument names).

    Args:
        input: (..., H) hidden states, float16/bfloat16/float32/float64, CPU or CUDA tensors
            (CUDA: chunks of whole rows on the GPU, checked on the host emulator).
        linear_weight: (V, H), ``nn.Linear``'s layout, the input's dtype.
        target: integer class indices of the input's shape without H.
        linear_bias: (V,) or None.
        temperature, softcap, ignore_index: as ``token_stats``.

    Returns:
        ``TokenStats`` of the target's shape; logprob, entropy and lse are differentiable
        w.r.t. input, weight and bias. The forward holds one block of logits at a time; the
        backward computes them again, block by block, to form the gradients.
    """
    _check(input, target)
    if linear_weight.dim() != 2 or input.dim() < 1 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight must be (V, {input.shape[-1] if input.dim() else '?'}); got {tuple(linear_weight.shape)}"
        )
    lead_shape = input.shape[:-1]
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the input's shape without H, {tuple(lead_shape)}"
        )
    rows = input.reshape(-1, input.shape[-1]).contiguous()
    logprob, entropy, lse, argmax, _ = _linear_token_stats_op(
        rows,
        linear_weight.contiguous(),
        None if linear_bias is None else linear_bias.contiguous(),
        target.reshape(-1).contiguous(),
        float(temperature),
        None if softcap is None else float(softcap),
        int(ignore_index),
    )
    return TokenStats(*(t.reshape(lead_shape) for t in (logprob, entropy, lse, argmax)))
