"""What is benchmarked: the case grid, the input data, the bytes model and the tolerances.

One source of truth for ``fastxent bench`` and the pytest-benchmark suite in ``benchmarks/``.

Shapes are (rows N, classes C) with C from real vocabularies: 32000 (Llama 2, Mistral),
128256 (Llama 3), 256000 (Gemma). Every implementation computes the "mean" reduction over the
rows, the common training loss, and in forward+backward mode also its gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

try:
    from ml_dtypes import bfloat16 as _BFLOAT16
except ImportError:  # pragma: no cover - ml_dtypes is a runtime dependency
    _BFLOAT16 = None

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)
_MODE_ALIASES = {
    "forward": FORWARD,
    "fwd": FORWARD,
    "forward+backward": FORWARD_BACKWARD,
    "fwd+bwd": FORWARD_BACKWARD,
    "backward": FORWARD_BACKWARD,
}

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a dtype name ("bfloat16" comes from ml_dtypes)."""
    if name == "bfloat16":
        if _BFLOAT16 is None:  # pragma: no cover - ml_dtypes is a runtime dependency
            raise ValueError("bfloat16 needs the ml_dtypes package")
        return np.dtype(_BFLOAT16)
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return np.dtype(name)


@dataclass(frozen=True)
class Case:
    """One input: N rows of C classes in one dtype."""

    num_rows: int
    num_classes: int
    dtype: str = "float32"

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_rows, self.num_classes)

    @property
    def itemsize(self) -> int:
        return numpy_dtype(self.dtype).itemsize

    @property
    def logits_bytes(self) -> int:
        return self.num_rows * self.num_classes * self.itemsize

    @property
    def name(self) -> str:
        return f"{self.num_rows}x{self.num_classes} {self.dtype}"

    @property
    def id(self) -> str:
        """A name without spaces, for pytest ids and file names."""
        return f"{self.num_rows}x{self.num_classes}-{self.dtype}"


# The developers' suite (benchmarks/): full-size shapes, about 0.5-1 GB of logits each.
SUITE_CASES = (
    Case(4096, 32000, "float32"),
    Case(2048, 128256, "float32"),
    Case(1024, 256000, "float32"),
    Case(2048, 128256, "bfloat16"),
)

# `fastxent bench` with no arguments: about a minute on two cores, the peers taking most of it.
# Every float32 array is larger than a typical L3 cache, so memory traffic is measured, not cache.
DEFAULT_CASES = (
    Case(256, 32000, "float32"),
    Case(256, 128256, "float32"),
    Case(64, 256000, "float32"),
    Case(128, 128256, "bfloat16"),
)

# `fastxent bench --quick`: a few seconds per implementation.
QUICK_CASES = (
    Case(64, 32000, "float32"),
    Case(32, 128256, "float32"),
    Case(32, 128256, "bfloat16"),
)

DEFAULT_REPEATS = 5
QUICK_REPEATS = 3


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """ "2048x128256,512x32000" -> [(2048, 128256), (512, 32000)]."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*[xX*]\s*(\d+)", item)
        if not match:
            raise ValueError(f"shape {item!r} is not ROWSxCLASSES, e.g. 2048x128256")
        rows, classes = int(match.group(1)), int(match.group(2))
        if rows < 1 or classes < 1:
            raise ValueError(f"shape {item!r} must have at least one row and one class")
        shapes.append((rows, classes))
    if not shapes:
        raise ValueError("no shape given")
    return shapes


def parse_dtypes(text: str) -> List[str]:
    dtypes = [part.strip() for part in text.split(",") if part.strip()]
    for name in dtypes:
        numpy_dtype(name)
    if not dtypes:
        raise ValueError("no dtype given")
    return dtypes


def parse_modes(text: str) -> List[str]:
    modes = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if part in ("both", "all"):
            modes.extend(MODES)
        elif part in _MODE_ALIASES:
            modes.append(_MODE_ALIASES[part])
        else:
            raise ValueError(f"unknown mode {part!r}; expected forward, forward+backward or both")
    if not modes:
        raise ValueError("no mode given")
    return [mode for mode in MODES if mode in modes]


def grid(shapes: Iterable[Tuple[int, int]], dtypes: Sequence[str]) -> List[Case]:
    """Every shape in every dtype, grouped by dtype."""
    shapes = list(shapes)
    return [Case(rows, classes, dtype) for dtype in dtypes for rows, classes in shapes]


def make_inputs(case: Case, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) in the case's dtype and int64 labels (N,), the same for every caller.

    Logits are normal with standard deviation 2, about the spread of a language model's
    output. Each row is a window, at a random offset, of one pool of 4M normal numbers: as
    random as the benchmark needs, and a gigabyte is built in a fraction of a second (drawing
    every number takes seconds, and memory measurements rebuild the data in other processes).
    Deterministic in (case, seed).
    """
    rng = np.random.default_rng([seed, case.num_rows, case.num_classes])
    pool = rng.standard_normal(max(1 << 22, 2 * case.num_classes), dtype=np.float32)
    pool *= 2.0
    offsets = rng.integers(0, pool.shape[0] - case.num_classes + 1, size=case.num_rows)
    dtype = numpy_dtype(case.dtype)
    pool = pool.astype(dtype)
    logits = np.empty(case.shape, dtype=dtype)
    for row, offset in enumerate(offsets):
        logits[row] = pool[offset : offset + case.num_classes]
    labels = rng.integers(0, case.num_classes, size=case.num_rows, dtype=np.int64)
    return logits, labels


def bytes_moved(case: Case, mode: str) -> int:
    """Bytes that must cross the memory bus at least: the "GB/s" figures divide this by time.

    forward: read the logits once (and the labels). forward+backward: read the logits once and
    write a gradient of the same size (a row of up to 256k float32 fits in L2, so a fused
    kernel's second sweep over it need not go back to memory).
    """
    labels = case.num_rows * 8
    if mode == FORWARD:
        return case.logits_bytes + labels
    return 2 * case.logits_bytes + labels


# Largest accepted error, by the dtype the implementation returns (its loss, its gradient):
# a result rounded to bfloat16 cannot be closer than bfloat16's precision allows. Loss error is
# relative, |loss - ref| / |ref|; gradient error is max |grad - ref| / max |ref|. Half precision
# allows two ulps at the top of a binade (2**-9 for float16, 2**-6 for bfloat16): a peer that
# accumulates the mean in bfloat16 lands an ulp away.
TOLERANCE: Dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 2.0**-9,
    "bfloat16": 2.0**-6,
}


def tolerance_for(result_dtype: str) -> float:
    return TOLERANCE.get(str(result_dtype), TOLERANCE["float32"])
