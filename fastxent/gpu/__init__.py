"""CUDA backend (CuPy RawKernels), imported lazily so CPU-only machines never need CuPy.

``xent.py`` holds the typed launchers of the kernels in ``xent.cu``; ``partial.py`` the
class-range statistics and gradient (the range layer's ``CupyKernel``).

``warm_up`` compiles the kernels ahead of the first call.

Imports run one way: ``fastxent._api`` (by array type) and ``fastxent.distributed`` import this
package; it imports CuPy and the range layer (``fastxent._range``), never ``fastxent.cpu``, the
public API or a framework.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import numpy


def load_backend() -> Tuple[Any, Any]:
    """Return (cupy, launcher module) or raise ImportError with an install hint."""
    try:
        import cupy
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError(
            "CuPy arrays need the GPU backend: install CuPy for your CUDA version, e.g. `pip install cupy-cuda12x`"
        ) from error
    from fastxent.gpu import xent

    return cupy, xent


def warm_up(dtypes: Iterable[Any] = ("float32", "bfloat16"), *, device: Optional[int] = None) -> int:
    """Compile the CUDA kernels now and load those of ``dtypes`` on ``device``, so that the
    first loss call of a training job does not wait for them.

    NVRTC compiles ``xent.cu`` once per process and device (tens of seconds on a cold cache);
    CuPy keeps the result in its on-disk kernel cache (``CUPY_CACHE_DIR``, by default
    ``~/.cupy/kernel_cache``), so later processes with the same CuPy, CUDA and source only load
    it. Call it once at start-up, e.g. on every rank before the first step.

    Args:
        dtypes: logit dtypes whose kernels to load: names ("float16", "bfloat16", "float32",
            "float64") or NumPy dtypes.
        device: CUDA device id (default: the current device).

    Returns:
        The number of kernels loaded.
    """
    cupy, xent = load_backend()
    from fastxent.gpu import _names

    names = []
    for dtype in dtypes:
        name = dtype if isinstance(dtype, str) else numpy.dtype(dtype).name
        if name not in _names.DTYPES:
            raise ValueError(f"warm_up: no kernels for dtype {name!r}; the kernels take {', '.join(_names.DTYPES)}")
        for kind in _names.LOGIT_KINDS:
            names += [_names.kernel_name(kind, name), _names.kernel_name(kind, name, softcap=True)]
        names += [_names.kernel_name(kind, name) for kind in _names.PLAIN_KINDS]
    with cupy.cuda.Device(device):
        xent.current_limits()
        for name in names:
            xent.get_kernel(name)
    return len(names)
