"""Pick Numba's threading layer before the first parallel kernel runs.

fastxent must be callable from several Python threads at once and from a process forked after
a call. Numba's default "workqueue" layer is neither thread- nor fork-safe, and GNU OpenMP is
not fork-safe; Intel TBB is both. The ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib``,
which the dynamic loader does not search inside a virtual environment, so it is loaded here
by path (RTLD_GLOBAL) before Numba looks for it. Where TBB cannot be loaded Numba falls back to
"omp" (thread-safe), and ``threading_layer_in_use`` says which one runs.

An explicit ``NUMBA_THREADING_LAYER`` in the environment is respected.
"""

from __future__ import annotations

import ctypes
import os
import sys

from numba import config


def _preload_tbb() -> bool:
    candidates = [os.path.join(sys.prefix, "lib", "libtbb.so.12")]
    if sys.base_prefix != sys.prefix:
        candidates.append(os.path.join(sys.base_prefix, "lib", "libtbb.so.12"))
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    try:  # a system-wide TBB on the loader path
        ctypes.CDLL("libtbb.so.12", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "tbb" if _preload_tbb() else "safe"


def threading_layer_in_use() -> str:
    """The Numba threading layer running fastxent's kernels (after the first parallel call)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return "not started"
