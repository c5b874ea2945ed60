"""Names of the kernel instantiations in ``xent.cu``: one place for the launcher and the CI check.

Importing this module needs neither CuPy nor a GPU, so ``tools/check_cuda.py`` can verify that
nvcc emitted every entry the launcher will ask for.
"""

from __future__ import annotations

from typing import Tuple

# Storage dtypes of the logits, as they appear in the entry names (xent_fwd_bfloat16, ...).
DTYPES = ("float16", "bfloat16", "float32", "float64")

# Kernels over logits, each compiled with and without the softcap transform.
LOGIT_KINDS = ("fwd", "fwd_bwd", "part_stats", "part_grad", "token_stats", "token_grad")
# Kernels compiled once per dtype: the probability-input path, and the in-place scaling of a
# kept gradient by a device scalar (skipped on the device when it is 1).
PLAIN_KINDS = ("prob", "scale")


def kernel_name(kind: str, dtype: str, softcap: bool = False) -> str:
    """The extern "C" name of one instantiation, e.g. ``xent_fwd_bwd_softcap_bfloat16``."""
    if kind not in LOGIT_KINDS + PLAIN_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown kernel dtype {dtype!r}")
    if softcap and kind not in LOGIT_KINDS:
        raise ValueError(f"kernel kind {kind!r} has no softcap variant")
    return f"xent_{kind}{'_softcap' if softcap else ''}_{dtype}"


def all_kernel_names() -> Tuple[str, ...]:
    """Every instantiation the source defines, in a stable order."""
    names = []
    for dtype in DTYPES:
        for kind in LOGIT_KINDS:
            names.append(kernel_name(kind, dtype))
            names.append(kernel_name(kind, dtype, softcap=True))
        for kind in PLAIN_KINDS:
            names.append(kernel_name(kind, dtype))
    return tuple(names)
