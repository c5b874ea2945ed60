"""Single-thread, in-L1 cost per logit of the statistics loop (one block's exps with the next
block's min and max, ``segment_sum_exp_ahead``) and of the gradient sweep (``logit_range_grad``),
for float32, bfloat16 and float16: the minimum over many short repetitions, which a loaded
machine disturbs less than a median. One JSON line per run; compare trees in alternation:

    PYTHONPATH=$tree NUMBA_CACHE_DIR=$tree/.nbcache python benchmarks/half_loops.py $tree
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial

import ml_dtypes
import numba
import numpy as np

from fastxent.cpu import _kernels as K

DTYPES = (
    ("float32", np.float32, np.float32),
    ("bfloat16", ml_dtypes.bfloat16, np.uint16),
    ("float16", np.float16, np.int16),
)


@numba.njit
def repeat_stats(segment, reference, ahead, repeats):
    total = 0.0
    for _ in range(repeats):
        block_sum, lowest, _ = K.segment_sum_exp_ahead(segment, reference, True, ahead, None)
        total += block_sum + lowest
    return total


@numba.njit
def repeat_grad(row, out, row_max, lowest, repeats):
    for _ in range(repeats):
        K.logit_range_grad(row, out, 0, row.shape[0], row_max, 1e-4, 0.0, None, None, lowest)


def fastest(call, logits: int, samples: int = 600) -> float:
    """ns per logit of the fastest of ``samples`` calls."""
    best = float("inf")
    for _ in range(samples):
        start = time.perf_counter_ns()
        call()
        best = min(best, time.perf_counter_ns() - start)
    return best / logits


def main(tag: str) -> None:
    rng = np.random.default_rng(0)
    result = {"tag": tag}
    for name, dtype, storage in DTYPES:
        values = (rng.standard_normal(4096) * 3).astype(dtype)
        row = values.view(storage)
        row_max = float(values.astype(np.float32).max())
        lowest = float(values.astype(np.float32).min())
        stats = partial(repeat_stats, row[:2048], np.float32(row_max), row[2048:], 50)
        grad = partial(repeat_grad, row, np.empty_like(row), row_max, lowest, 25)
        stats(), grad()  # compile
        result[f"{name} stats ns/logit"] = round(fastest(stats, 2048 * 50), 4)
        result[f"{name} grad ns/logit"] = round(fastest(grad, 4096 * 25), 4)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
