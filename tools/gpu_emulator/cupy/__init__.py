"""A NumPy-backed stand-in for the part of CuPy that fastxent and its GPU tests use.

Put ``tools/gpu_emulator`` first on ``PYTHONPATH`` and ``import cupy`` gives this module: arrays
are NumPy arrays of a subclass whose type lives in module "cupy" (so fastxent dispatches them
to its GPU backend), with CuPy's ``.data.ptr``, ``.get()`` and flags (no "writeable"), and
``RawModule`` compiles the CUDA source for the host emulator (see ``emulated_kernels.py``).
It checks what a real launch would reject: block and grid limits, dynamic shared memory above
the kernel's limit, arguments that are not explicitly typed or do not match the signature.
Never installed: tests only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time
import types

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emulated_kernels  # noqa: E402

__version__ = "0.0-emulated"
EMULATED = True

# Device figures of the emulated GPU. Few SMs keep the split-row path reachable with small
# inputs and the number of emulated blocks small.
_SM_COUNT = int(os.environ.get("FASTXENT_EMULATED_SM_COUNT", "4"))
# Two devices by default, so that code which launches on the wrong one fails here: every array
# remembers the device current at its creation, and a launch checks its kernel and arguments.
_DEVICE_COUNT = int(os.environ.get("FASTXENT_EMULATED_DEVICE_COUNT", "2"))
# CuPy's per-thread default stream mode: every thread's current stream then has the same handle
# (cudaStreamPerThread), though the streams are distinct.
_PER_THREAD_DEFAULT_STREAM = os.environ.get("CUPY_CUDA_PER_THREAD_DEFAULT_STREAM") == "1"
_STREAM_PER_THREAD = 2  # cudaStreamPerThread
_state = threading.local()  # the current device, per host thread as in CUDA


def _current_device() -> int:
    return getattr(_state, "device", 0)


def _set_device(device_id) -> None:
    device_id = int(device_id)
    if not 0 <= device_id < _DEVICE_COUNT:
        raise RuntimeError(f"cudaErrorInvalidDevice: device {device_id} of {_DEVICE_COUNT}")
    _state.device = device_id


_LIMITS = {"shared_per_block": 227 * 1024, "shared_per_sm": 228 * 1024}
_ATTRIBUTES = {16: _SM_COUNT, 81: _LIMITS["shared_per_sm"], 89: 1 << 20, 97: _LIMITS["shared_per_block"]}


class _MemoryPointer:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class _Flags:
    """CuPy's flags: contiguity and ownership, no "writeable"."""

    def __init__(self, c_contiguous: bool, f_contiguous: bool, owndata: bool):
        self.c_contiguous = c_contiguous
        self.f_contiguous = f_contiguous
        self.owndata = owndata


# Reads of device values by the host (each one a synchronisation on a real GPU), counted so the
# tests can check how many a call makes. Emulator only: CuPy has no such counter.
_host_reads = 0


def host_reads() -> int:
    """How many device-to-host reads (bool/int/float/item/get/tolist of a device array) so far."""
    return _host_reads


def _count_read():
    global _host_reads
    _host_reads += 1


class ndarray(numpy.ndarray):
    """A "device" array: NumPy memory with CuPy's attributes.

    As in CuPy, reductions give 0-d device arrays rather than host scalars, and turning one into
    a Python value is a device-to-host read (counted, see ``host_reads``).
    """

    def __array_finalize__(self, obj):
        # A view keeps its base's device; new memory is on the current device.
        source = obj
        while source is not None and not hasattr(source, "_device_id"):
            source = getattr(source, "base", None)
        self._device_id = source._device_id if source is not None else _current_device()

    @property
    def device(self):
        return _Device(self._device_id)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return numpy.ndarray.__array_wrap__(self, array, context, False)

    def __bool__(self):
        _count_read()
        return numpy.ndarray.__bool__(self)

    def __float__(self):
        _count_read()
        return numpy.ndarray.__float__(self)

    def __int__(self):
        _count_read()
        return numpy.ndarray.__int__(self)

    def __index__(self):
        _count_read()
        return numpy.ndarray.__index__(self)

    def item(self, *args):
        _count_read()
        return numpy.ndarray.item(self, *args)

    def tolist(self):
        _count_read()
        return numpy.ndarray.tolist(self)

    @property
    def data(self):
        return _MemoryPointer(self.__array_interface__["data"][0])

    @property
    def flags(self):
        flags = numpy.ndarray.flags.__get__(self)
        return _Flags(bool(flags.c_contiguous), bool(flags.f_contiguous), bool(flags.owndata))

    def get(self):
        _count_read()
        return numpy.array(self.view(numpy.ndarray), copy=True)


def _wrap(result):
    if isinstance(result, numpy.ndarray) and not isinstance(result, ndarray):
        return result.view(ndarray)
    if isinstance(result, numpy.generic):  # CuPy functions return 0-d device arrays
        return numpy.asarray(result).view(ndarray)
    if isinstance(result, tuple):
        return tuple(_wrap(item) for item in result)
    return result


def __getattr__(name):
    attribute = getattr(numpy, name)
    if isinstance(attribute, type) or not callable(attribute):
        return attribute

    @functools.wraps(attribute)
    def wrapped(*args, **kwargs):
        return _wrap(attribute(*args, **kwargs))

    return wrapped


def asarray(a, dtype=None, order=None):
    """Device arrays pass through; host data is copied, as a transfer would."""
    if isinstance(a, ndarray):
        return _wrap(numpy.asarray(a, dtype=dtype, order=order))
    return numpy.array(a, dtype=dtype, order=order, copy=True).view(ndarray)


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray) and not copy:
        return asarray(a, dtype=dtype)
    return numpy.array(a, dtype=dtype, copy=True, order=order).view(ndarray)


def asnumpy(a):
    if isinstance(a, ndarray):
        return a.get()
    return numpy.asarray(a)


def ascontiguousarray(a, dtype=None):
    return _wrap(numpy.ascontiguousarray(a, dtype=dtype))


class RawModule:
    def __init__(self, *, code=None, path=None, options=(), backend="nvrtc", name_expressions=None, **_ignored):
        if code is None:
            raise ValueError("the emulator compiles source code only")
        self._code = code
        self.options = tuple(options)
        self._library = None
        self._kernels = {}

    def get_function(self, name):
        if self._library is None:
            self._library = emulated_kernels.build(self._code)
        key = (name, _current_device())  # loaded on the current device, as cuModuleLoad does
        if key not in self._kernels:
            self._kernels[key] = emulated_kernels.EmulatedKernel(
                self._library, name, _LIMITS, key[1], current_device=_current_device
            )
        return self._kernels[key]


class _Device:
    def __init__(self, device_id=None):
        self.id = _current_device() if device_id is None else int(device_id)
        self.compute_capability = "90"
        self._previous = []

    def use(self):
        _set_device(self.id)

    def __enter__(self):
        self._previous.append(_current_device())
        _set_device(self.id)
        return self

    def __exit__(self, *exc):
        _set_device(self._previous.pop())

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"

    def synchronize(self):
        pass


def _current_stream():
    return types.SimpleNamespace(ptr=_STREAM_PER_THREAD if _PER_THREAD_DEFAULT_STREAM else 0)


def _device_get_attribute(attribute, device_id):
    return _ATTRIBUTES[int(attribute)]


class _Event:
    """Host clock instead of a GPU timeline: the emulator runs kernels synchronously."""

    def __init__(self, *args, **kwargs):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


def _get_elapsed_time(start, end):
    return (end.time - start.time) * 1e3


class _MemoryPool:
    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _MemoryPool()


def _cublas_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    """cupy.cublas.gemm: out = alpha op(a) op(b) + beta out, written into ``out`` (C-contiguous)."""
    op_a = a.T if transa in ("T", "t", 1) else a
    op_b = b.T if transb in ("T", "t", 1) else b
    product = numpy.matmul(op_a.view(numpy.ndarray), op_b.view(numpy.ndarray))
    if out is None:
        return (alpha * product).astype(a.dtype).view(ndarray)
    if not out.flags.c_contiguous:
        raise ValueError("cupy.cublas.gemm: out must be C-contiguous")
    base = out.view(numpy.ndarray)
    base[...] = alpha * product + (beta * base if beta != 0.0 else 0.0)
    return out


cublas = types.SimpleNamespace(gemm=_cublas_gemm)

# GEMMs so far, as (entry, A dtype, B dtype, C dtype) names, so the tests can check which
# operands reach them (emulator only: CuPy has no such log).
_gemm_calls = []


def gemm_calls():
    """The GEMMs so far: (entry, A dtype, B dtype, output dtype) for each matmul, cupy.cublas.gemm
    and cublasGemmEx call."""
    return list(_gemm_calls)


def matmul(a, b, out=None, **kwargs):
    _gemm_calls.append(
        ("matmul", numpy.dtype(a.dtype).name, numpy.dtype(b.dtype).name, None if out is None else out.dtype.name)
    )
    return _wrap(numpy.matmul(a, b, out=out, **kwargs))


_original_cublas_gemm = _cublas_gemm


def _logged_cublas_gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    if a.dtype != b.dtype or (out is not None and out.dtype != a.dtype) or a.dtype.char not in "fd":
        raise TypeError("cupy.cublas.gemm: invalid dtype")  # sgemm/dgemm only, as CuPy's
    _gemm_calls.append(("cublas.gemm", a.dtype.name, b.dtype.name, None if out is None else out.dtype.name))
    return _original_cublas_gemm(transa, transb, a, b, out=out, alpha=alpha, beta=beta)


cublas.gemm = _logged_cublas_gemm


def _bfloat16():
    import ml_dtypes

    return numpy.dtype(ml_dtypes.bfloat16)


# cudaDataType codes of cublasGemmEx and the compute types it accepts for them.
_CUDA_DATA_TYPES = {0: lambda: numpy.dtype(numpy.float32), 2: lambda: numpy.dtype(numpy.float16), 14: _bfloat16}
_CUBLAS_COMPUTE_32F = 68


def _column_major(ptr, dtype, rows, cols, lead):
    """The column-major (rows, cols) matrix at device address ``ptr`` with leading dimension
    ``lead``, as a NumPy view of the emulated device memory."""
    if lead < max(1, rows):
        raise ValueError(f"CUBLAS_STATUS_INVALID_VALUE: leading dimension {lead} < {rows} rows")
    if rows == 0 or cols == 0:
        return numpy.zeros((rows, cols), dtype=dtype)
    count = (cols - 1) * lead + rows
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    flat = numpy.frombuffer(buffer, dtype=dtype, count=count)
    return numpy.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(dtype.itemsize, lead * dtype.itemsize))


def _gemm_ex(
    handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo
):
    """cublasGemmEx (column-major, alpha/beta host float32 pointers): C = alpha op(A) op(B) +
    beta C, computed in float32 from the operands as stored, as tensor cores do (float32
    products of the half-precision values, float32 sums)."""
    if Atype != Btype or Atype not in (0, 2, 14) or Ctype != 0 or computeType != _CUBLAS_COMPUTE_32F:
        raise RuntimeError(f"CUBLAS_STATUS_NOT_SUPPORTED: types A {Atype}, B {Btype}, C {Ctype}, compute {computeType}")
    a_type, b_type, c_type = (_CUDA_DATA_TYPES[code]() for code in (Atype, Btype, Ctype))
    a = _column_major(A, a_type, *((m, k) if transa == 0 else (k, m)), lda)
    b = _column_major(B, b_type, *((k, n) if transb == 0 else (n, k)), ldb)
    c = _column_major(C, c_type, m, n, ldc)
    op_a = a if transa == 0 else a.T
    op_b = b if transb == 0 else b.T
    alpha_value = float(numpy.frombuffer((ctypes.c_char * 4).from_address(alpha), dtype=numpy.float32)[0])
    beta_value = float(numpy.frombuffer((ctypes.c_char * 4).from_address(beta), dtype=numpy.float32)[0])
    product = numpy.matmul(op_a.astype(numpy.float32), op_b.astype(numpy.float32))
    if c.size:
        c[...] = alpha_value * product + (beta_value * c if beta_value != 0.0 else 0.0)
    _gemm_calls.append(("gemmEx", a_type.name, b_type.name, c_type.name))


cuda_cublas = types.SimpleNamespace(gemmEx=_gemm_ex)

# Device memory the emulated GPU reports (bytes): free, total.
_MEMORY = (int(os.environ.get("FASTXENT_EMULATED_FREE_MEMORY", str(64 << 30))), 80 << 30)

cuda = types.SimpleNamespace(
    cublas=cuda_cublas,
    device=types.SimpleNamespace(get_cublas_handle=lambda: _current_device() + 1),
    runtime=types.SimpleNamespace(
        memGetInfo=lambda: _MEMORY,
        getDeviceCount=lambda: _DEVICE_COUNT,
        getDevice=_current_device,
        setDevice=_set_device,
        deviceGetAttribute=_device_get_attribute,
        CUDARuntimeError=RuntimeError,
        getDeviceProperties=lambda device_id: {"name": b"emulated GPU (host)"},
        runtimeGetVersion=lambda: 0,
    ),
    Device=_Device,
    Event=_Event,
    get_elapsed_time=_get_elapsed_time,
    get_current_stream=_current_stream,
)
