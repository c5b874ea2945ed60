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
