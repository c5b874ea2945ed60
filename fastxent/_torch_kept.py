"""Kept gradients handed from a compiled forward to its backward by ticket.

The fused kernel computes a loss's gradient in its forward sweep. Eagerly, autograd saves that
gradient and ``loss.backward()`` (an incoming gradient of 1) hands it on as it is. A compiled
backward cannot: its graph has no branch on the incoming gradient's value, and a gradient saved by
the forward is a graph input that Inductor copies before any operator may change it. Either way
every backward paid a full pass over the (N, C) gradient.

So under ``torch.compile`` the forward operator keeps its gradients here, under a key, and returns
a ticket: a CPU int64 scalar tensor holding the key. The backward operator takes the gradients
out by ticket, scales them in place when the incoming gradient is not 1, and returns them: they
are its own outputs, no graph input is mutated, nothing is copied. CUDA tensors take the same
path eagerly too: reading a CUDA incoming gradient on the host would stall the stream, so a
kernel reads it on the device and skips the pass for 1 (``fastxent.gpu.xent.scale_unless_one``),
and a scaled loss's backward needs no second (N, C) buffer.

A ticket is good for one take: a second backward through the same graph (``retain_graph=True``)
finds nothing and recomputes the gradients, bit for bit those of the first (the kernels are
deterministic within a process). The kept gradients live as long as their ticket: when the
autograd graph holding the ticket is freed without a backward, they go with it.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

_kept: Dict[int, Tuple[Tensor, ...]] = {}
_keys = itertools.count(1)
_lock = threading.Lock()


def keep(gradients: Sequence[Tensor]) -> Tensor:
    """Keep ``gradients`` until the returned ticket is taken or freed.

    Returns:
        A 0-d int64 CPU tensor naming them (the same shape and dtype on every device).
    """
    with _lock:
        key = next(_keys)
        _kept[key] = tuple(gradients)
    ticket = torch.tensor(key, dtype=torch.int64)
    weakref.finalize(ticket, forget, key)
    return ticket


def take(ticket: Tensor) -> Optional[Tuple[Tensor, ...]]:
    """The gradients kept under ``ticket``, removed; None when already taken (or never kept)."""
    with _lock:
        return _kept.pop(int(ticket), None)


def forget(key: int) -> None:
    """Drop the gradients kept under ``key`` if they are still there."""
    with _lock:
        _kept.pop(key, None)


def kept_count() -> int:
    """How many tickets hold gradients now (for tests: none may outlive its graph)."""
    with _lock:
        return len(_kept)


def ticket_like() -> Tensor:
    """A ticket's shape and dtype, for fake implementations."""
    return torch.empty((), dtype=torch.int64, device="cpu")


def is_one(grad_output: Tensor) -> bool:
    """Whether the incoming gradient is the 1.0 of ``loss.backward()``, read without a device
    sync (only a CPU scalar is looked at: a CUDA one is always multiplied)."""
    return grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0


def scale_in_place(gradient: Tensor, grad_output: Tensor, class_axis: Optional[int] = None) -> Tensor:
    """``gradient`` times the incoming gradient, written over ``gradient`` (the same multiply,
    and so the same bits, as eager code's out-of-place one); per-row incoming gradients
    (reduction "none") are broadcast along ``class_axis``.

    A scalar on the CPU is looked at here (1 skips the multiply). On CUDA a kernel reads the
    scalar on the device and skips the pass there, so no stream waits for the host."""
    if class_axis is not None:
        gradient.mul_(grad_output.unsqueeze(class_axis).to(gradient.dtype))
    elif gradient.device.type == "cuda" and gradient.is_contiguous():
        _scale_on_device(gradient, grad_output)
    elif not is_one(grad_output):
        gradient.mul_(grad_output.to(gradient.dtype))
    return gradient


def _scale_on_device(gradient: Tensor, grad_output: Tensor) -> None:
    """``gradient *= grad_output`` on PyTorch's current stream, skipped on the device for 1."""
    from fastxent import _torch_interop as interop
    from fastxent.gpu.xent import scale_unless_one

    factor = grad_output.detach().reshape(1).to(device=gradient.device, dtype=gradient.dtype)
    with interop.on_stream(gradient):
        view, storage = interop.to_cupy_storage(gradient.reshape(-1))
        factor_view, _ = interop.to_cupy_storage(factor)
        scale_unless_one(view, factor_view, storage or str(view.dtype))
