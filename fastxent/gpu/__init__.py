"""CUDA backend (CuPy RawKernels), imported lazily so CPU-only machines never need CuPy.

``xent.py`` holds the typed launchers of the kernels in ``xent.cu``; ``partial.py`` the
class-range statistics and gradient (the range layer's ``CupyKernel``).

Imports run one way: ``fastxent._api`` (by array type) and ``fastxent.distributed`` import this
package; it imports CuPy and the range layer (``fastxent._range``), never ``fastxent.cpu``, the
public API or a framework.
"""

from __future__ import annotations

from typing import Any, Tuple


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
