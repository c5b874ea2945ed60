"""Forward and forward+backward timings for every suite case, implementation and the floor."""

from __future__ import annotations

from fastxent.bench.cases import FORWARD, MODES
from fastxent.bench.peers import IMPLEMENTATIONS


def params(cases):
    """(case, mode, name) for every case, mode, implementation and the floor, case outermost so
    that one case's arrays are in memory at a time."""
    for case in cases:
        for mode in MODES:
            names = [name for name in IMPLEMENTATIONS if mode in IMPLEMENTATIONS[name].modes]
            names.append("floor-read" if mode == FORWARD else "floor-copy")
            for name in names:
                yield case, mode, name


def test_cross_entropy(benchmark, bench, case, mode, name):
    """Parametrised by ``pytest_generate_tests`` in conftest.py (``--bench-shapes`` picks others)."""
    impl = bench.impl(name)
    state = bench.state(impl, case)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(rows=case.num_rows, classes=case.num_classes, dtype=case.dtype, mode=mode,
                                threads=bench.threads)

    def setup():
        impl.reset(state)  # untimed: in place overwrites its input, so each round gets fresh logits

    def call():
        out = impl.run(state, mode)
        impl.wait(out)

    benchmark.pedantic(call, setup=setup, rounds=bench.rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        bench.medians[(case, mode, name)] = benchmark.stats.stats.median
