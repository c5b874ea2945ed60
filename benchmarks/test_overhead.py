"""Per-call overhead on the CPU: the public call against the launcher alone.

    pytest benchmarks/test_overhead.py                       every case
    pytest benchmarks/test_overhead.py --benchmark-group-by=param:case

"launcher" is ``fastxent.cpu.xent.fused_xent`` given arguments already checked and encoded:
the kernel the public call would pick, with its output allocation and nothing else. The
difference to "api" is the per-call cost of the public function (checks, label encoding,
softmax hint, reduction). Calls take microseconds, so each round times many of them.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent
from fastxent import _api
from fastxent.cpu import xent as cpu_xent

# (rows, classes, dtype, mode): the overhead cases, and two between them
CASES = (
    (8, 1000, "float32", "forward+backward"),
    (8, 1000, "float32", "forward"),
    (64, 1000, "float32", "forward+backward"),
    (4, 256000, "float32", "forward"),
    (4, 256000, "float32", "forward+backward"),
)


def _inputs(rows, classes, dtype):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, classes), dtype=np.float32).astype(dtype)
    labels = rng.integers(0, classes, rows)
    return logits, labels


def _iterations(rows, classes):
    return max(1, min(200, 2_000_000 // (rows * classes)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("what", ("api", "launcher"))
def test_overhead(benchmark, case, what):
    rows, classes, dtype, mode = case
    logits, labels = _inputs(rows, classes, dtype)
    want_grad = mode == "forward+backward"
    if what == "api":
        entry = fastxent.sparse_cross_entropy_with_grad if want_grad else fastxent.sparse_cross_entropy

        def call():
            return entry(logits, labels)

    else:
        prepared = _api.prepare(
            logits,
            labels,
            from_logits=True,
            reduction="mean",
            ignore_index=None,
            label_smoothing=0.0,
            class_weight=None,
            sample_weight=None,
            z_loss=0.0,
            softcap=None,
            axis=-1,
        )

        def call():
            return cpu_xent.fused_xent(
                logits, prepared.labels, prepared.row_weight, prepared.options, want_grad=want_grad
            )

    benchmark.group = f"{rows}x{classes} {dtype} {mode}"
    benchmark.extra_info.update(rows=rows, classes=classes, dtype=dtype, mode=mode, what=what)
    benchmark.pedantic(call, rounds=30, iterations=_iterations(rows, classes), warmup_rounds=2)
