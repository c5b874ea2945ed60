"""pytest-benchmark suite: fastxent against NumPy, TensorFlow, PyTorch and JAX on the CPU.

    pytest benchmarks/                               time every case (a few minutes, ~1 GB arrays)
    pytest benchmarks/ --cpu-report                  ... and write benchmarks/results/cpu.md
    pytest benchmarks/ -k "128256 and float32"       one shape
    pytest benchmarks/ --bench-shapes 64x32000       a quick try on other shapes

The cases and the implementations are those of ``fastxent bench`` (``fastxent.bench``); this
suite only times them. Validation against the float64 reference is the CLI's job
(``fastxent bench --shapes 2048x128256``) and the tests'.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import pytest

from fastxent.bench.cases import SUITE_CASES, Case, grid, make_inputs, parse_dtypes, parse_shapes
from fastxent.bench.floor import Floor
from fastxent.bench.peers import IMPLEMENTATIONS

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def pytest_addoption(parser):
    group = parser.getgroup("fastxent benchmarks")
    group.addoption(
        "--cpu-report",
        nargs="?",
        const=os.path.join(RESULTS, "cpu.md"),
        default=None,
        metavar="PATH",
        help="write medians and ratios as Markdown (default benchmarks/results/cpu.md)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("FASTXENT_BENCH_THREADS", "2")),
        help="threads for every implementation (default 2)",
    )
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark (default 5)")
    group.addoption(
        "--bench-shapes",
        default=None,
        metavar="NxC,...",
        help="other shapes than the suite's, e.g. 64x32000 for a quick try",
    )
    group.addoption(
        "--bench-dtypes", default="float32", metavar="DTYPE,...", help="dtypes for --bench-shapes (default float32)"
    )


def pytest_generate_tests(metafunc):
    if {"case", "mode", "name"} <= set(metafunc.fixturenames):
        from test_cpu import params

        shapes = metafunc.config.getoption("--bench-shapes")
        cases = (
            SUITE_CASES
            if not shapes
            else grid(parse_shapes(shapes), parse_dtypes(metafunc.config.getoption("--bench-dtypes")))
        )
        chosen = list(params(cases))
        metafunc.parametrize(
            "case, mode, name", chosen, ids=[f"{case.id}-{mode}-{name}" for case, mode, name in chosen]
        )


class Bench:
    """Loaded implementations and the current case's inputs (one case in memory at a time)."""

    def __init__(self, threads: int, rounds: int):
        self.threads = threads
        self.rounds = rounds
        self.impls: Dict[str, object] = {}
        self.reasons: Dict[str, str] = {}
        self.case = None
        self.inputs: Tuple = ()
        self.states: Dict[str, object] = {}
        self.medians: Dict[Tuple[Case, str, str], float] = {}

    def impl(self, name: str):
        if name.startswith("floor"):
            return Floor(name.split("-")[1])
        if name not in self.impls and name not in self.reasons:
            impl = IMPLEMENTATIONS[name]()
            reason = impl.load("cpu", self.threads)
            if reason is None:
                self.impls[name] = impl
            else:
                self.reasons[name] = reason
        if name in self.reasons:
            pytest.skip(f"{name}: {self.reasons[name]}")
        return self.impls[name]

    def state(self, impl, case: Case):
        if case != self.case:
            self.case, self.states, self.inputs = case, {}, ()
            self.inputs = make_inputs(case)
        if impl.name not in self.states:
            self.states = {}  # the previous implementation's copy of the inputs goes first
            self.states[impl.name] = impl.prepare(*self.inputs)
        return self.states[impl.name]


@pytest.fixture(scope="session")
def bench(request):
    return request.config._fastxent_bench


def pytest_configure(config):
    config._fastxent_bench = Bench(config.getoption("--bench-threads"), config.getoption("--bench-rounds"))


def pytest_sessionfinish(session):
    path = session.config.getoption("--cpu-report")
    state: Bench = session.config._fastxent_bench
    if path and state.medians:
        from suite_report import write_cpu_report

        write_cpu_report(path, state)
