"""The forward and the three forward+backward destinations at one shape, for comparing two trees.

    for i in 1 2 3; do
        for tree in /path/to/old /path/to/new; do
            PYTHONPATH=$tree NUMBA_CACHE_DIR=$tree/.nbcache python benchmarks/gradient_ab.py $tree
        done
    done

Each round times, in an order rotating from round to round, the read and copy floors
(``fastxent.bench.floor``), the forward (``fastxent.sparse_cross_entropy``) and
``sparse_cross_entropy_with_grad`` writing in place (logits restored from a pristine copy before
each call, outside the timing), into a kept ``out=`` buffer, and into a new array. On a shared
machine absolute times drift, so each round's times are also divided by the same round's floor
(forward by one read, forward+backward by read + write) and the medians of those ratios printed
with the median times (ms). One JSON line per run.

Arguments: tag [rows [classes [rounds [dtype]]]]; defaults 2048 128256 9 float32.
"""

from __future__ import annotations

import json
import sys
import time

import ml_dtypes
import numpy as np

import fastxent
from fastxent.bench.floor import Floor

DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def main(tag: str, rows: int = 2048, classes: int = 128256, rounds: int = 9, dtype: str = "float32") -> None:
    rng = np.random.default_rng(0)
    pristine = (rng.standard_normal((rows, classes), dtype=np.float32) * 3).astype(DTYPES[dtype])
    labels = rng.integers(0, classes, rows)
    work = pristine.copy()
    out = np.empty_like(pristine)
    read, copy = Floor("read"), Floor("copy")
    read_state, copy_state = read.prepare(pristine, labels), copy.prepare(pristine, labels)
    cases = {
        "floor-read": lambda: read.run(read_state),
        "floor-copy": lambda: copy.run(copy_state),
        "fwd": lambda: fastxent.sparse_cross_entropy(pristine, labels),
        "fwdbwd inplace": lambda: fastxent.sparse_cross_entropy_with_grad(work, labels, inplace=True),
        "fwdbwd out": lambda: fastxent.sparse_cross_entropy_with_grad(pristine, labels, out=out),
        "fwdbwd new": lambda: fastxent.sparse_cross_entropy_with_grad(pristine, labels),
    }
    names = list(cases)
    for call in cases.values():  # warm-up: compile or load every kernel
        np.copyto(work, pristine)
        call()
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            np.copyto(work, pristine)
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    result = {"tag": tag, "shape": f"{rows}x{classes}", "dtype": dtype, "rounds": rounds}
    for name in names:
        result[name + " ms"] = round(float(np.median(times[name])) * 1e3, 2)
    for name in names[2:]:
        floor = np.array(times["floor-read" if name == "fwd" else "floor-copy"])
        result[name + " / floor"] = round(float(np.median(np.array(times[name]) / floor)), 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0] if args else "run",
        *map(int, args[1:4]),
        *args[4:5],
    )
