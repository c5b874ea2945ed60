"""PyTorch tensors <-> fastxent's arrays, for ``fastxent.torch`` and ``fastxent.distributed``.

One place for how a tensor reaches the kernels: zero-copy through DLPack (NumPy views of CPU
tensors, CuPy views of CUDA tensors), bfloat16 through its bits where the array library has no
bfloat16 in DLPack, and CuPy's launches on PyTorch's current stream of the tensor's device.

Supported: float16, bfloat16, float32 and float64 tensors on the CPU and on CUDA devices, in both
``fastxent.torch`` and ``fastxent.distributed``. A bfloat16 CUDA tensor is viewed as CuPy's
bfloat16 where CuPy has that dtype; otherwise the class-range kernels (``fastxent.distributed``)
read its bits (``storage="bfloat16"``), and the public API (``fastxent.torch``) takes a float32
copy: the kernels compute bfloat16 in float32 and round the gradient once, so the values are
the same, at the cost of the copy.

Imports torch: only the torch adapters import this module.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICE_TYPES = ("cpu", "cuda")


def _numpy_bfloat16() -> np.dtype:
    from ml_dtypes import bfloat16

    return np.dtype(bfloat16)


def cupy_module():
    """CuPy, through fastxent's GPU backend (which raises an install hint without it)."""
    from fastxent.gpu import load_backend

    return load_backend()[0]


class _SameStreamExport:
    """A CUDA tensor as CuPy's ``from_dlpack`` sees it: its DLPack export with no stream
    hand-over, whatever stream CuPy names as the consumer.

    CuPy names its current stream, which in its per-thread default stream mode
    (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``) is the value 2, and PyTorch refuses to export to
    that stream (``BufferError``). No hand-over is needed: fastxent launches CuPy's work on
    PyTorch's current stream of the tensor's device (``on_stream``), the stream the tensor's
    producer ordered its writes on, so ``stream=-1`` (no synchronisation) is exact.
    """

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()

    def __dlpack__(self, *, stream: Any = None, **kwargs: Any):
        return self._tensor.__dlpack__(stream=-1, **kwargs)


def cupy_view(tensor: torch.Tensor):
    """CuPy's zero-copy view of a CUDA tensor, in every CuPy stream mode (see ``_SameStreamExport``)."""
    return cupy_module().from_dlpack(_SameStreamExport(tensor))


def _cupy_bfloat16_view(tensor: torch.Tensor):
    """CuPy's own zero-copy view of a bfloat16 tensor, or None where CuPy has no bfloat16 (its
    DLPack import refuses the dtype)."""
    try:
        return cupy_view(tensor)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


def check_plain(tensor: torch.Tensor) -> None:
    """TypeError for a tensor whose own storage is not its data: a DTensor (its storage is empty
    or unrelated; its data is per-rank local tensors), a nested tensor, any wrapper subclass.
    Reading such a storage would give the kernels the wrong memory."""
    if is_traceable_wrapper_subclass(tensor):
        raise TypeError(
            f"fastxent's kernels read plain tensors; got a {type(tensor).__name__} (a wrapper around other "
            "tensors): fastxent.torch.cross_entropy and linear_cross_entropy take DTensors themselves, "
            "other code must pass the local tensors (dtensor.to_local())"
        )


def check_tensor(tensor: torch.Tensor) -> None:
    """TypeError unless fastxent's kernels take the tensor's device and dtype (see the module docstring)."""
    check_plain(tensor)
    if tensor.device.type not in DEVICE_TYPES:
        raise TypeError(f"fastxent takes CPU or CUDA tensors; got a tensor on {tensor.device}")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (bfloat16 through its bits, as ml_dtypes' bfloat16)."""
    check_plain(tensor)
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_numpy_bfloat16())
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing the array's memory (bfloat16 through its bits)."""
    if array.dtype == _numpy_bfloat16():
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_cupy_storage(tensor: torch.Tensor) -> Tuple[Any, Optional[str]]:
    """(zero-copy CuPy view, storage name) of a tensor for the GPU launchers: bfloat16 as its
    uint16 bits with ``storage="bfloat16"`` where CuPy has no bfloat16 dtype, else (view, None)."""
    check_plain(tensor)
    cupy = cupy_module()
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        view = _cupy_bfloat16_view(tensor)
        if view is None:
            return cupy_view(tensor.view(torch.int16)).view(cupy.uint16), "bfloat16"
        return view, None
    return cupy_view(tensor), None


def to_array(tensor: torch.Tensor):
    """An array of the tensor's values for the public API: a NumPy (CPU) or CuPy (CUDA) view of
    its memory, except a bfloat16 CUDA tensor where CuPy has no bfloat16 (a float32 copy)."""
    check_tensor(tensor)
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        if tensor.dtype == torch.bfloat16:
            view = _cupy_bfloat16_view(tensor)
            return cupy_view(tensor.float()) if view is None else view
        return cupy_view(tensor)
    if tensor.dtype == torch.bfloat16:
        # NumPy has no bfloat16 in DLPack: view the bits as int16, then as ml_dtypes' bfloat16.
        return np.from_dlpack(tensor.view(torch.int16)).view(_numpy_bfloat16())
    return np.from_dlpack(tensor)


def to_tensor(array) -> torch.Tensor:
    """A tensor sharing the array's memory: on the CPU for NumPy, on the GPU for CuPy."""
    if isinstance(array, np.ndarray):
        return from_numpy(array)
    return torch.from_dlpack(array)


def on_stream(tensor: torch.Tensor):
    """A context in which CuPy launches on PyTorch's current stream of the tensor's device and
    allocates from PyTorch's caching allocator (nothing to do for a CPU tensor).

    Outputs (the gradients handed to autograd) and CuPy's temporaries then live in PyTorch's
    memory: ``torch.cuda.memory_allocated`` counts them, PyTorch reuses their blocks when freed,
    and neither pool holds memory the other could have used.
    """
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    cupy = cupy_module()
    context = contextlib.ExitStack()
    context.enter_context(cupy.cuda.Device(tensor.device.index))
    context.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(tensor.device).cuda_stream))
    context.enter_context(cupy.cuda.using_allocator(torch_allocator(cupy)))
    return context


def _torch_malloc(size: int, device_id: int) -> int:
    """A block of PyTorch's caching allocator on ``device_id``, for use on its current stream."""
    stream = torch.cuda.current_stream(device_id).cuda_stream
    return torch.cuda.caching_allocator_alloc(size, device_id, stream)


def _torch_free(pointer: int, device_id: int) -> None:
    torch.cuda.caching_allocator_delete(pointer)


@functools.lru_cache(maxsize=None)
def torch_allocator(cupy: Any):
    """CuPy's allocator function backed by PyTorch's caching allocator (one per CuPy module)."""
    return cupy.cuda.PythonFunctionAllocator(_torch_malloc, _torch_free).malloc


def host(value: Any, dtype: Any = None) -> Optional[np.ndarray]:
    """A tensor or array-like as a NumPy array in host memory (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        check_plain(value)
        value = value.detach().cpu()
        value = to_numpy(value) if value.dtype == torch.bfloat16 else value.numpy()
    return np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)
