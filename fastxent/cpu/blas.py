"""GEMM with accumulation, ``C += A^T B``, through NumPy's own BLAS.

NumPy's ``matmul`` writes its result into ``out`` but cannot add to it, and the linear
cross-entropy's weight gradient is a sum over row chunks: ``dW += G_c^T X_c``. Adding a
temporary would cost a (V, H) buffer or small, slow GEMMs. BLAS's ``gemm`` adds in place
(``beta = 1``); this module finds the CBLAS entry of the OpenBLAS that NumPy's wheels bundle
(``numpy.libs/libscipy_openblas64_*.so``, 64-bit integers) and calls it with ctypes: no new
dependency, the same library and thread pool as ``numpy.matmul``.

Where that library is not found (a NumPy built against another BLAS), ``accumulate_at_b``
falls back to ``matmul`` into a bounded temporary, a block of rows of C at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading
from typing import Iterator, Optional

import numpy as np

# CBLAS enums.
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Rows of C per fallback block: the temporary is at most this many rows of C.
FALLBACK_ROWS = 1024


def _load_library() -> Optional[ctypes.CDLL]:
    """NumPy's bundled OpenBLAS, or None when there is none."""
    numpy_dir = os.path.dirname(np.__file__)
    candidates = sorted(glob.glob(os.path.join(numpy_dir, os.pardir, "numpy.libs", "libscipy_openblas*.so*")))
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


_LIBRARY = _load_library()


def _load_cblas() -> Optional[dict]:
    """{dtype: ctypes gemm} from NumPy's bundled OpenBLAS, or None when there is none."""
    if _LIBRARY is None:
        return None
    found = {}
    for dtype, letter, scalar in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
        for name, index in (
            (f"scipy_cblas_{letter}gemm64_", ctypes.c_int64),
            (f"scipy_cblas_{letter}gemm", ctypes.c_int),
        ):
            function = getattr(_LIBRARY, name, None)
            if function is None:
                continue
            enum = ctypes.c_int
            pointer = ctypes.c_void_p
            function.argtypes = [enum, enum, enum, index, index, index, scalar, pointer, index]
            function.argtypes += [pointer, index, scalar, pointer, index]
            function.restype = None
            found[np.dtype(dtype)] = function
            break
    if len(found) == 2:
        return found
    return None


_CBLAS = _load_cblas()


def has_cblas() -> bool:
    """Whether ``accumulate_at_b`` calls BLAS with beta = 1 (else the bounded fallback)."""
    return _CBLAS is not None


def _leading(array: np.ndarray) -> int:
    return array.strides[0] // array.itemsize


def _rows_contiguous(array: np.ndarray) -> bool:
    return (
        array.ndim == 2 and array.strides[1] == array.itemsize and array.strides[0] >= array.shape[1] * array.itemsize
    )


def accumulate_at_b(a: np.ndarray, b: np.ndarray, c: np.ndarray, *, use_cblas: Optional[bool] = None) -> None:
    """C += A^T B in place.

    Args:
        a: (K, M) float32/float64, rows contiguous (a row-major block, possibly a row slice).
        b: (K, N) same dtype, rows contiguous.
        c: (M, N) same dtype, C-contiguous rows (a row slice of a larger array is fine).
        use_cblas: force (True) or avoid (False) the BLAS call; None uses it where found.
    """
    k, m = a.shape
    n = b.shape[1]
    assert b.shape[0] == k and c.shape == (m, n), (a.shape, b.shape, c.shape)
    assert a.dtype == b.dtype == c.dtype, (a.dtype, b.dtype, c.dtype)
    if k == 0 or m == 0 or n == 0:
        return
    cblas = _CBLAS if use_cblas is not False else None
    layouts_ok = _rows_contiguous(a) and _rows_contiguous(b) and _rows_contiguous(c)
    if cblas is not None and layouts_ok and a.dtype in cblas:
        cblas[a.dtype](
            _ROW_MAJOR,
            _TRANS,
            _NO_TRANS,
            m,
            n,
            k,
            1.0,
            a.ctypes.data,
            _leading(a),
            b.ctypes.data,
            _leading(b),
            1.0,
            c.ctypes.data,
            _leading(c),
        )
        return
    temp = np.empty((min(m, FALLBACK_ROWS), n), dtype=c.dtype)
    for lo in range(0, m, FALLBACK_ROWS):
        hi = min(lo + FALLBACK_ROWS, m)
        block = temp[: hi - lo]
        np.matmul(a[:, lo:hi].T, b, out=block)
        c[lo:hi] += block


def _thread_functions() -> Optional[tuple]:
    """(get, set) of OpenBLAS's process-wide thread count, or None."""
    if _LIBRARY is None:
        return None
    for suffix in ("64_", "_64_", ""):
        get = getattr(_LIBRARY, f"scipy_openblas_get_num_threads{suffix}", None)
        put = getattr(_LIBRARY, f"scipy_openblas_set_num_threads{suffix}", None)
        if get is not None and put is not None:
            get.argtypes, get.restype = [], ctypes.c_int
            put.argtypes, put.restype = [ctypes.c_int], None
            return get, put
    return None


_THREADS = _thread_functions()
# ``single_threaded`` is entered by concurrent calls: the first saves the count, the last restores it.
_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 1


def has_thread_control() -> bool:
    """Whether ``single_threaded`` can make NumPy's GEMMs run on their calling threads."""
    return _THREADS is not None


def num_threads() -> int:
    """The threads NumPy's BLAS runs a GEMM on (1 where that cannot be read)."""
    return max(1, int(_THREADS[0]())) if _THREADS is not None else 1


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Within the block, NumPy's BLAS runs each GEMM on the thread that calls it.

    For callers that bring their own threads, each calling GEMMs side by side. OpenBLAS's
    count is process-wide (its "local" setter also is, in the pthreads builds NumPy ships), so
    other threads' GEMMs are single-threaded meanwhile too. Nested and concurrent uses are
    counted: the count in force before the first is restored when the last one leaves. A no-op
    where the BLAS offers no such control.
    """
    global _THREADS_USERS, _THREADS_SAVED
    if _THREADS is None:
        yield
        return
    get, put = _THREADS
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = get()
            put(1)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                put(_THREADS_SAVED)
