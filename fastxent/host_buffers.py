"""Aligned host buffers, reused once every view of them is gone.

Adapters hand the gradient they compute to their framework without a copy (DLPack), which asks
for 64-byte aligned memory. A fresh N x C buffer costs a page fault per page on first touch
(on a 1024 x 128256 float32 gradient, about as long as the fused kernel's own pass), so the
buffers of large results are kept after their last user lets go and handed out again for a
result of the same size.

A buffer is free when nothing but the pool refers to its memory: every NumPy view of it, and
every framework tensor made from such a view through DLPack, holds a reference to the owning
array, so its reference count says when the last one is gone.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import List, Optional

import numpy as np

ALIGNMENT = 64
# Smaller results are allocated afresh: their page faults cost little.
MIN_POOLED_BYTES = 1 << 20


class HostBufferPool:
    """Up to ``capacity`` large aligned buffers, each reused once nothing else refers to it.

    Memory held by the pool while unused is at most ``capacity`` times the largest result.
    ``clear()`` lets it go.
    """

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._owners: List[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``, 64-byte aligned."""
        dtype = np.dtype(dtype)
        shape = tuple(int(n) for n in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return _view(np.empty(nbytes + ALIGNMENT, np.uint8), shape, dtype, nbytes)
        with self._lock:
            owner = self._take_free(nbytes + ALIGNMENT)
            if owner is None:
                owner = np.empty(nbytes + ALIGNMENT, np.uint8)
                self._owners.append(owner)
                self._evict()
        return _view(owner, shape, dtype, nbytes)

    def clear(self) -> None:
        """Forget every buffer (those in use are freed when their last user lets go)."""
        with self._lock:
            self._owners.clear()

    def _take_free(self, size: int):
        for index in range(len(self._owners)):
            if self._owners[index].size == size and self._is_free(index):
                # Most recently used last: eviction takes the oldest first.
                owner = self._owners.pop(index)
                self._owners.append(owner)
                return owner
        return None

    def _evict(self) -> None:
        index = 0
        while len(self._owners) > self.capacity and index < len(self._owners):
            if self._is_free(index):
                del self._owners[index]
            else:
                index += 1
        # Buffers still in use beyond capacity are forgotten: freed when their users finish.
        del self._owners[: max(0, len(self._owners) - self.capacity)]

    def _is_free(self, index: int) -> bool:
        # Two references when nothing else holds it: the pool's list and getrefcount's argument.
        return sys.getrefcount(self._owners[index]) == 2


def _view(owner: np.ndarray, shape, dtype: np.dtype, nbytes: int) -> np.ndarray:
    offset = (-owner.ctypes.data) % ALIGNMENT
    return owner[offset : offset + nbytes].view(dtype).reshape(shape)


# The pool the adapters share: a gradient handed to one framework and released is reused by the
# next call of any adapter.
ADAPTER_POOL = HostBufferPool()


def host_output_like(array) -> Optional[np.ndarray]:
    """An aligned, pooled array shaped like the NumPy ``array`` for a result an adapter hands to
    its framework; None for device arrays (their backend allocates)."""
    if not isinstance(array, np.ndarray):
        return None
    return ADAPTER_POOL.empty(array.shape, array.dtype)
