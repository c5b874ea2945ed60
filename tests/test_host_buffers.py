"""The aligned host-buffer pool: alignment, and reuse only once every view is gone."""

from __future__ import annotations

import numpy as np

from fastxent.host_buffers import ALIGNMENT, MIN_POOLED_BYTES, HostBufferPool

LARGE = (64, MIN_POOLED_BYTES // 64)  # float32: 4x the pooled minimum


def test_buffers_are_aligned_and_shaped():
    pool = HostBufferPool()
    for shape, dtype in ((LARGE, np.float32), ((3, 5), np.float64), ((0, 7), np.float32)):
        array = pool.empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        # Empty arrays have no memory to align.
        assert array.size == 0 or array.ctypes.data % ALIGNMENT == 0


def test_reused_only_after_every_view_is_gone():
    pool = HostBufferPool()
    first = pool.empty(LARGE, np.float32)
    address = first.ctypes.data
    derived = first[1:].reshape(-1)  # a view of a view still holds the memory
    del first
    second = pool.empty(LARGE, np.float32)
    assert second.ctypes.data != address and not np.shares_memory(second, derived)
    del derived
    third = pool.empty(LARGE, np.float32)
    assert third.ctypes.data == address
    # A DLPack capsule also holds the memory.
    capsule = third.__dlpack__()
    del third
    assert pool.empty(LARGE, np.float32).ctypes.data != address
    del capsule
    assert pool.empty(LARGE, np.float32).ctypes.data == address


def test_capacity_bounds_what_is_kept():
    pool = HostBufferPool(capacity=1)
    arrays = [pool.empty(LARGE, np.float32) for _ in range(3)]
    addresses = {a.ctypes.data for a in arrays}
    assert len(addresses) == 3 and len(pool._owners) <= 1
    del arrays
    again = pool.empty(LARGE, np.float32)
    pool.clear()
    assert again.ctypes.data % ALIGNMENT == 0 and not pool._owners
