"""Forward and forward+backward timings for every suite case, implementation and the floor."""

from __future__ import annotations

from fastxent.bench.cases import FORWARD, MODES
from fastxent.bench.peers import IMPLEMENTATIONS


def params(cases):
    """(case, mode, name) for every case, implementation, mode and the floor; case outermost,
    then implementation, so that one case's arrays and one implementation's copy of them are
    in memory at a time (each float32 suite case is 0.5-1 GB)."""
    for case in cases:
        for name in list(IMPLEMENTATIONS) + ["floor-read", "floor-copy"]:
            for mode in MODES:
                if name.startswith("floor"):
                    if (name == "floor-read") == (mode == FORWARD):
                        yield case, mode, name
                elif mode in IMPLEMENTATIONS[name].modes:
                    yield case, mode, name


def test_cross_entropy(benchmark, bench, case, mode, name):
    """Parametrised by ``pytest_generate_tests`` in conftest.py (``--bench-shapes`` picks others)."""
    impl = bench.impl(name)
    state = bench.state(impl, case)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(
        rows=case.num_rows, classes=case.num_classes, dtype=case.dtype, mode=mode, threads=bench.threads
    )

    def setup():
        impl.reset(state)  # untimed: in place overwrites its input, so each round gets fresh logits

    def call():
        out = impl.run(state, mode)
        impl.wait(out)

    benchmark.pedantic(call, setup=setup, rounds=bench.rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        bench.medians[(case, mode, name)] = benchmark.stats.stats.median
