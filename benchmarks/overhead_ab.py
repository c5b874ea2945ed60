"""Per-call overhead of whichever fastxent is importable, for comparing two trees in alternation.

    for i in 1 2 3 4; do
        for tree in /path/to/old /path/to/new; do PYTHONPATH=$tree python benchmarks/overhead_ab.py $tree; done
    done

On a shared machine absolute times drift from minute to minute; running the two trees in
alternation, several times, and comparing medians of the same round is what makes the ratio
meaningful. Prints one line per run: medians in microseconds of the public call ("api") and of
the launcher alone (``fastxent.cpu.xent.fused_xent`` with arguments already checked: the
kernel the call picks and its output allocation), and for 4 x 256000 the median over
interleaved pairs of api / launcher.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import fastxent
from fastxent import _api
from fastxent.cpu import xent


def median_us(call, calls_per_round: int, rounds: int = 25) -> float:
    for _ in range(max(3, calls_per_round // 5)):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls_per_round):
            call()
        times.append((time.perf_counter() - start) / calls_per_round)
    return float(np.median(times)) * 1e6


def launcher(logits, labels, want_grad):
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
    return lambda: xent.fused_xent(logits, prepared.labels, prepared.row_weight, prepared.options, want_grad=want_grad)


def main(tag: str) -> None:
    rng = np.random.default_rng(0)
    small = rng.standard_normal((8, 1000), dtype=np.float32), rng.integers(0, 1000, 8)
    wide = rng.standard_normal((4, 256000), dtype=np.float32), rng.integers(0, 256000, 4)
    results = {
        "8x1000 fwd+bwd api": median_us(lambda: fastxent.sparse_cross_entropy_with_grad(*small), 300),
        "8x1000 fwd+bwd launcher": median_us(launcher(*small, True), 300),
        "8x1000 fwd api": median_us(lambda: fastxent.sparse_cross_entropy(*small), 300),
        "8x1000 fwd launcher": median_us(launcher(*small, False), 300),
    }
    alone = launcher(*wide, False)
    api_times, alone_times = [], []
    for _ in range(40):
        start = time.perf_counter()
        fastxent.sparse_cross_entropy(*wide)
        api_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        alone()
        alone_times.append(time.perf_counter() - start)
    results["4x256000 fwd api"] = float(np.median(api_times)) * 1e6
    results["4x256000 fwd launcher"] = float(np.median(alone_times)) * 1e6
    results["4x256000 api/launcher"] = float(np.median(np.array(api_times) / np.array(alone_times)))
    print(tag, " | ".join(f"{name}: {value:.2f}" for name, value in results.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else fastxent.__file__)
