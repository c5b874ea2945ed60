"""pytest-benchmark cases of the fused linear + cross-entropy: the cases and implementations of
``fastxent bench --op linear`` (``fastxent.bench.linear``), timed one benchmark each.

    pytest benchmarks/test_linear.py                       both headline shapes (minutes)
    pytest benchmarks/test_linear.py -k "2048x512x128256 and forward-"

Each implementation is timed against the bare GEMMs of the same shape (the "numpy GEMM" and
"torch GEMM" rows); ``fastxent bench --op linear`` interleaves them and reports the ratios.
"""

from __future__ import annotations

import pytest

from fastxent.bench import linear

MODES = ("forward", "forward+backward")
NAMES = (
    "numpy GEMM",
    "fastxent",
    "torch GEMM",
    "torch unfused",
    "torch F.linear_cross_entropy",
    "torch F.linear_cross_entropy chunked",
    "jax optax",
)
_CALLS: dict = {}


def _calls(shape, mode):
    """The implementations of one (shape, mode), built once (their arrays are up to 1 GB)."""
    key = (shape, mode)
    if key not in _CALLS:
        _CALLS.clear()  # one shape's arrays in memory at a time
        try:
            import torch
        except ImportError:
            torch = None
        _CALLS[key] = linear.implementations(linear.Case(*shape), mode, torch)
    return _CALLS[key]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", linear.HEADLINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_cross_entropy(benchmark, bench, shape, mode, name):
    calls = _calls(shape, mode)
    if name not in calls:
        pytest.skip(f"{name} is not installed here")
    benchmark.group = f"linear {'x'.join(map(str, shape))} {mode}"
    benchmark.extra_info.update(rows=shape[0], features=shape[1], classes=shape[2], mode=mode)
    benchmark.pedantic(calls[name], rounds=bench.rounds, warmup_rounds=1, iterations=1)
