"""The machine's floor: the least time any implementation can take on the same logits.

``read``  one read of every byte of the logits (a bitwise OR over them, which cannot be
          skipped and costs nothing next to the memory traffic);
``copy``  one read of the logits and one write of a buffer of the same size, allocated and
          touched beforehand (a gradient must be written somewhere).

Forward is compared with ``read``, forward+backward with ``copy``. On the CPU both are Numba
loops over fixed-size chunks of the flat array on the same threads as fastxent, so a few long
rows still use every thread; on the GPU they are a CuPy max over the same words and a CuPy copy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# 256 KiB per task: large enough to stream, small enough to balance two to a few dozen threads.
CHUNK_BYTES = 1 << 18

_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@njit(parallel=True, cache=True)
def _or_chunks(words, chunk):
    num_chunks = (words.shape[0] + chunk - 1) // chunk
    partial = np.zeros(num_chunks, dtype=np.uint64)
    for task in prange(num_chunks):
        lo = task * chunk
        part = words[lo : min(lo + chunk, words.shape[0])]
        bits = part.dtype.type(0)
        for j in range(part.shape[0]):
            bits |= part[j]
        partial[task] = bits
    return partial


@njit(parallel=True, cache=True)
def _copy_chunks(source, dest, chunk):
    num_chunks = (source.shape[0] + chunk - 1) // chunk
    for task in prange(num_chunks):
        lo = task * chunk
        hi = min(lo + chunk, source.shape[0])
        part_in = source[lo:hi]
        part_out = dest[lo:hi]
        for j in range(part_in.shape[0]):
            part_out[j] = part_in[j]


def _flat_words(array):
    """The array's bytes as the widest unsigned words that divide its size (copies vectorize
    poorly on 16-bit words)."""
    flat = array.reshape(-1).view(np.uint8)
    for width in (8, 4, 2, 1):
        if flat.shape[0] % width == 0:
            return flat.view(_WORD[width])


class Floor:
    """A pseudo-implementation with the peers' interface (see ``peers.Implementation``)."""

    is_peer = False
    framework = "numpy"

    def __init__(self, kind: str, device: str = "cpu"):
        assert kind in ("read", "copy")
        self.kind = kind
        self.device = device
        self.name = f"floor-{kind}"
        self.label = "floor: one read" if kind == "read" else "floor: read + write"

    def prepare(self, logits, labels, modes=None):
        state = {"logits": logits}
        if self.kind == "copy":
            dest = logits.copy()  # allocated and touched once, outside the timing
            state["dest"] = dest
        return state

    def reset(self, state):
        pass

    def run(self, state, mode=None):
        logits = state["logits"]
        if self.device == "gpu":
            import cupy

            if self.kind == "read":
                return cupy.max(_flat_words(logits))
            return cupy.copyto(state["dest"], logits)
        words = _flat_words(logits)
        chunk = max(1, CHUNK_BYTES // words.dtype.itemsize)
        if self.kind == "read":
            return _or_chunks(words, chunk)
        return _copy_chunks(words, _flat_words(state["dest"]), chunk)

    def wait(self, out):
        pass
