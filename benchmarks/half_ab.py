"""Half-precision vs float32 at one large shape, with the floors, for comparing two trees.

    for i in 1 2 3; do
        for tree in /path/to/old /path/to/new; do PYTHONPATH=$tree python benchmarks/half_ab.py $tree; done
    done

Each round times, in an order rotating from round to round, the read and copy floors of each
dtype's logits, the forward (``fastxent.sparse_cross_entropy``) and the in-place
forward+backward (``sparse_cross_entropy_with_grad(..., inplace=True)``; the logits are
restored from a pristine copy before each in-place call, outside the timing) for float32,
bfloat16 and float16. On a shared machine absolute times drift, so each round's times are also
taken as ratios to the same round's floor, and the medians of those ratios are printed with the
median times (ms). One JSON line per run.
"""

from __future__ import annotations

import json
import sys
import time

import ml_dtypes
import numpy as np

import fastxent
from fastxent.bench.floor import Floor

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def main(tag: str, rows: int = 2048, classes: int = 128256, rounds: int = 9) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, classes), dtype=np.float32) * 3
    labels = rng.integers(0, classes, rows)
    pristine = {name: base.astype(dtype) for name, dtype in DTYPES.items()}
    del base
    work = {name: array.copy() for name, array in pristine.items()}
    floors = {}
    for name, array in pristine.items():
        for kind in ("read", "copy"):
            floor = Floor(kind)
            floors[name, kind] = (floor, floor.prepare(array, labels))

    def forward(name):
        return lambda: fastxent.sparse_cross_entropy(pristine[name], labels)

    def backward(name):
        return lambda: fastxent.sparse_cross_entropy_with_grad(work[name], labels, inplace=True)

    cases = {}
    for name in DTYPES:
        for kind in ("read", "copy"):
            floor, state = floors[name, kind]
            cases[f"{name} floor-{kind}"] = (lambda f=floor, s=state: f.run(s), None)
        cases[f"{name} fwd"] = (forward(name), None)
        cases[f"{name} fwdbwd"] = (backward(name), name)
    names = list(cases)
    for call, restore in cases.values():  # warm-up: compile or load every kernel
        if restore:
            np.copyto(work[restore], pristine[restore])
        call()
    times = {case: [] for case in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for case in names[shift:] + names[:shift]:
            call, restore = cases[case]
            if restore:
                np.copyto(work[restore], pristine[restore])
            start = time.perf_counter()
            call()
            times[case].append(time.perf_counter() - start)
    result = {"tag": tag, "shape": f"{rows}x{classes}", "rounds": rounds}
    for case in names:
        result[case + " ms"] = round(float(np.median(times[case])) * 1e3, 2)
    for name in DTYPES:
        read = np.array(times[f"{name} floor-read"])
        copy = np.array(times[f"{name} floor-copy"])
        result[f"{name} fwd/read"] = round(float(np.median(np.array(times[f"{name} fwd"]) / read)), 3)
        result[f"{name} fwdbwd/copy"] = round(float(np.median(np.array(times[f"{name} fwdbwd"]) / copy)), 3)
    for name in ("bfloat16", "float16"):
        for mode in ("fwd", "fwdbwd"):
            ratio = np.array(times[f"float32 {mode}"]) / np.array(times[f"{name} {mode}"])
            result[f"{name} {mode} speed-up over float32"] = round(float(np.median(ratio)), 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run", *map(int, sys.argv[2:]))
