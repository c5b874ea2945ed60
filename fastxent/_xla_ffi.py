"""XLA FFI custom-call targets whose handler is a Python function over the buffers XLA owns.

``jax.ffi`` runs a foreign function as a custom call: XLA passes it a call frame holding its
argument and result buffers, and the function writes the results in place. Here the function
pointer is a ``ctypes`` trampoline into Python, and the handler gets NumPy arrays that are views
of XLA's own buffers: the logits reach the kernel without a copy, and the kernel writes the loss
and the gradient straight into the buffers XLA returns (``pure_callback`` copies both ways).

Only the CPU platform is served. The call frame is read through the stable C ABI of XLA's FFI
(``xla/ffi/api/c_api.h``): structures carry their sizes, and the handler reports the API version
the runtime itself announces, so it stays within the range that runtime accepts.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from typing import Callable, Dict, List, Sequence

import numpy as np

__all__ = ["register_host_target"]

# XLA_FFI_ExecutionStage: handlers are also called when a program is instantiated, prepared and
# initialised; only the execute stage does work.
_STAGE_EXECUTE = 3
_EXTENSION_METADATA = 1
_ERROR_INVALID_ARGUMENT = 3
_ERROR_INTERNAL = 13
_ARG_BUFFER = 1


def _dtypes() -> Dict[int, np.dtype]:
    """XLA_FFI_DataType codes of the types fastxent's kernels read or write."""
    from ml_dtypes import bfloat16

    codes = {
        1: np.bool_,
        2: np.int8,
        3: np.int16,
        4: np.int32,
        5: np.int64,
        6: np.uint8,
        7: np.uint16,
        8: np.uint32,
        9: np.uint64,
        10: np.float16,
        11: np.float32,
        12: np.float64,
        16: bfloat16,
    }
    return {code: np.dtype(dtype) for code, dtype in codes.items()}


class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("api_version", _ApiVersion),
        ("internal_api", ctypes.c_void_p),
        ("error_create", _ErrorCreate),
    ]


class _List(ctypes.Structure):
    """XLA_FFI_Args and XLA_FFI_Rets: a count, a type per entry and a pointer per entry."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("items", ctypes.POINTER(ctypes.c_void_p)),
    ]


class _Attrs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.c_void_p),
        ("names", ctypes.c_void_p),
        ("attrs", ctypes.c_void_p),
    ]


class _CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.POINTER(_ExtensionBase)),
        ("api", ctypes.POINTER(_Api)),
        ("ctx", ctypes.c_void_p),
        ("stage", ctypes.c_int),
        ("args", _List),
        ("rets", _List),
        ("attrs", _Attrs),
        ("future", ctypes.c_void_p),
    ]


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


_Handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


def _as_array(pointer: int, dtypes: Dict[int, np.dtype]) -> np.ndarray:
    """A NumPy view of the XLA buffer at ``pointer`` (an XLA_FFI_Buffer*)."""
    buffer = _Buffer.from_address(pointer)
    dtype = dtypes.get(buffer.dtype)
    if dtype is None:
        raise TypeError(f"XLA buffer of unsupported type code {buffer.dtype}")
    shape = tuple(buffer.dims[i] for i in range(buffer.rank))
    count = math.prod(shape)
    if count == 0 or not buffer.data:
        return np.empty(shape, dtype)
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(buffer.data)
    return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not Linux: no advice to give
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _advise_huge_pages(array: np.ndarray) -> None:
    """Ask Linux to back a large result buffer with huge pages before it is first written.

    XLA's host allocator does not (NumPy does, for its own arrays): a fresh N x C gradient then
    takes one page fault per 4 KiB on first touch, which costs more than the kernel's own pass.
    Memory already touched is unaffected, so the advice is harmless when a buffer is reused.
    """
    if _LIBC is None or array.nbytes < 2 * _HUGE_PAGE:
        return
    start = array.ctypes.data
    first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    last = (start + array.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if last > first:
        _LIBC.madvise(first, last - first, _MADV_HUGEPAGE)


def _error(frame: _CallFrame, message: str, code: int):
    create = frame.api.contents.error_create
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode("utf-8", "replace"), code)
    return create(ctypes.byref(args))


def _handler(compute: Callable[[List[np.ndarray], List[np.ndarray]], None], error_types: Sequence[type]):
    """The C entry point calling ``compute(arguments, results)`` on views of XLA's buffers."""
    dtypes = _dtypes()
    invalid = tuple(error_types)

    def entry(frame_pointer):
        frame = frame_pointer.contents
        try:
            if frame.extension_start and frame.extension_start.contents.type == _EXTENSION_METADATA:
                # Registration asks which FFI version the handler speaks: the runtime's own.
                extension = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension)).contents
                runtime = frame.api.contents.api_version
                metadata = extension.metadata.contents
                metadata.api_version = _ApiVersion(
                    ctypes.sizeof(_ApiVersion), None, runtime.major_version, runtime.minor_version
                )
                metadata.traits = 0
                return None
            if frame.stage != _STAGE_EXECUTE:
                return None
            arguments = [_as_array(frame.args.items[i], dtypes) for i in range(frame.args.size)]
            results = [_as_array(frame.rets.items[i], dtypes) for i in range(frame.rets.size)]
            for result in results:
                _advise_huge_pages(result)
            compute(arguments, results)
            return None
        except invalid as problem:
            return _error(frame, str(problem), _ERROR_INVALID_ARGUMENT)
        except BaseException as problem:  # never let an exception unwind into XLA's C++ frames
            return _error(frame, f"{type(problem).__name__}: {problem}", _ERROR_INTERNAL)

    return _Handler(entry)


# C entry points must outlive every program that calls them: kept for the process's lifetime.
_REGISTERED: Dict[str, object] = {}
_LOCK = threading.Lock()


def register_host_target(
    name: str,
    compute: Callable[[List[np.ndarray], List[np.ndarray]], None],
    error_types: Sequence[type] = (ValueError,),
) -> str:
    """Register ``compute`` as the CPU custom-call target ``name`` for ``jax.ffi.ffi_call``.

    ``compute(arguments, results)`` receives NumPy views of the call's argument buffers (to be
    read only) and result buffers (to be filled); exceptions of ``error_types`` reach JAX as
    INVALID_ARGUMENT errors with their message, others as INTERNAL errors. Registering a name
    twice keeps the first target. Returns ``name``.
    """
    import jax

    with _LOCK:
        if name not in _REGISTERED:
            entry = _handler(compute, error_types)
            pointer = ctypes.cast(entry, ctypes.c_void_p).value
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(pointer), platform="cpu", api_version=1)
            _REGISTERED[name] = entry
    return name
